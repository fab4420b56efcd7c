// The command groups of `microvpc`, in help order. A new group is one file
// under commands/ exporting register(program), plus one line here.
// (`vpc peer` is a subgroup of vpc, registered by vpc.ts from peer.ts.)
import type { Command } from "commander";
import * as acl from "./acl.js";
import * as completion from "./completion.js";
import * as config from "./config.js";
import * as connectivity from "./connectivity.js";
import * as dns from "./dns.js";
import * as fip from "./fip.js";
import * as flowLogs from "./flowlogs.js";
import * as host from "./host.js";
import * as ip from "./ip.js";
import * as metadata from "./metadata.js";
import * as nat from "./nat.js";
import * as nic from "./nic.js";
import * as pf from "./pf.js";
import * as sg from "./sg.js";
import * as status from "./status.js";
import * as subnet from "./subnet.js";
import * as vm from "./vm.js";
import * as version from "./version.js";
import * as vpc from "./vpc.js";
import * as vpn from "./vpn.js";

export const groups: { register(program: Command): void }[] = [
  vpc,
  subnet,
  ip,
  sg,
  acl,
  nat,
  fip,
  pf,
  vpn,
  dns,
  vm,
  connectivity,
  host,
  nic,
  flowLogs,
  metadata,
  status,
  config,
  version,
  completion,
];
