// Firewall delta benchmark (`npm run bench:fwdelta`; not a timed test): what
// one NIC's change costs the firewall as the host fills up. In this process:
// a real redis-server (test/lib/redis.ts) holding the firewall's records
// (FirewallStore: groups, bindings, the real LOAD_VPC script), FirewallSync
// applying to a real kernel namespace of this run through LinuxNft (the
// daemon's in-process libnftables; `--nft render` only renders each
// transaction to its text instead, as this bench did before the table's
// size was found to cost libnftables a cache load per transaction), and an
// in-memory netagent host reader (load() costs no Redis here, so the whole
// pass is, if anything, cheaper than in the daemon). Per level (0 and
// --nics NICs bound in one VPC, one security group), interleaved rounds of:
//   * whole: bind a new NIC (FirewallStore.bind) and a targeted pass over its
//     VPC without a hint — what every binding event cost before: the host's
//     NICs, their bindings, LOAD_VPC of the VPC, a full compile, elementDiff;
//     then unbind it and the same pass;
//   * delta: the same, the pass told which NIC changed (the event's hint):
//     that NIC's record, LOAD_VPC of that NIC, its part compiled, the patch.
// Prints p50/p99 of bind+pass and unbind+pass per level and mode (and of
// the nft apply alone inside them), the ratio of the loaded level to the
// empty one (issue 14: within 1.2×), and
// writes bench/results/fwdelta-<date>.json. Every loop is bounded; Redis is
// stopped at the end, also on failure; so is the one namespace (run prefix,
// test/lib/netns.ts), the only kernel state made.
//
// Options (after `npm run bench:fwdelta --`): --nics N (default 1000),
// --rounds N (default 40), --nft kernel|render (default kernel). --smoke:
// 50 NICs, 3 rounds.
import { performance } from "node:perf_hooks";
import { Redis } from "ioredis";
import { pino } from "pino";
import { LinuxNft, type NftRunner } from "../services/common/nft/linux.js";
import { netagentNames } from "../services/common/names.js";
import { render } from "../services/common/nft/tx.js";
import { FirewallStore } from "../services/firewall/store.js";
import { FirewallSync } from "../services/firewall/sync.js";
import type { HostDesired } from "../services/netagent/store.js";
import type { NicSpec } from "../services/netagent/plan.js";
import { deleteNetns, installCleanupHandlers, RUN_PREFIX, run } from "../test/lib/netns.js";
import { startRedis } from "../test/lib/redis.js";
import { check, heading, num, resultsFile, table, verdictTable, writeJson, type Verdict } from "./lib/report.js";
import { benchArgs, intOpt, runBench } from "./lib/run.js";
import { percentile, sorted } from "./lib/stats.js";

const opt = benchArgs(
  { nics: { type: "string", default: "1000" }, rounds: { type: "string", default: "40" }, nft: { type: "string", default: "kernel" } },
  { nics: "50", rounds: "3" },
);
if (opt.nft !== "kernel" && opt.nft !== "render") throw new Error(`--nft ${String(opt.nft)}: kernel or render`);
const KERNEL = opt.nft === "kernel";
const NICS = intOpt("nics", opt.nics, 1, 4000);
const ROUNDS = intOpt("rounds", opt.rounds, 1, 500);

const HOST = `${RUN_PREFIX}hv0`;
const VPC = "vpc-0000000000b1";
const SUBNET = "subnet-0000000000b1";
const hex12 = (i: number) => i.toString(16).padStart(12, "0");

interface Nic {
  nicId: string;
  address: string;
  mac: string;
  hostIf: string;
}
const nicOf = (i: number): Nic => {
  const h = hex12(i + 1);
  // One /16: 10.0.x.y with y in 2..254, x from i.
  const x = Math.floor(i / 250);
  const y = (i % 250) + 2;
  return { nicId: `nic-${h}`, address: `10.0.${x}.${y}`, mac: `02:00:${h.slice(4, 6)}:${h.slice(6, 8)}:${h.slice(8, 10)}:${h.slice(10, 12)}`, hostIf: `v${h}` };
};

async function main(): Promise<number> {
  const ns = netagentNames.netns(HOST, VPC);
  if (KERNEL) {
    installCleanupHandlers();
    await run("ip", ["netns", "add", ns]);
  }
  const redisSrv = await startRedis({ appendfsync: "no" });
  const redis = new Redis(redisSrv.url, { lazyConnect: false });
  try {
    const log = pino({ level: "silent" });
    const store = new FirewallStore(redis, log);
    await redis.hset(`mvpc:vpc:${VPC}`, "id", VPC);
    const { group } = await store.createGroup(
      {
        vpcId: VPC,
        name: "web",
        description: "",
        labels: [],
        rules: [
          { dir: "ingress", proto: "tcp", portFrom: 80, portTo: 80, cidr: "10.0.0.0/16", description: "" },
          { dir: "ingress", proto: "icmp", portFrom: 0, portTo: 0, cidr: "10.0.0.0/16", description: "" },
        ],
      },
      "",
    );
    const records = new Map<string, NicSpec>();
    const spec = (n: Nic) =>
      ({
        ...n,
        vpcId: VPC,
        subnetId: SUBNET,
        prefix: 16,
        gateway: "10.0.0.1",
        owner: "",
        kind: "veth",
        mtu: 1500,
        hostname: "",
        guestIf: "",
      }) as unknown as NicSpec;
    const host = {
      load: async (): Promise<HostDesired> =>
        ({
          vpcs: new Map([[VPC, { vpcId: VPC, ns: "bench", createdMs: 0 }]]),
          subnets: new Map([[SUBNET, { subnetId: SUBNET, vpcId: VPC, cidr: "10.0.0.0/16", gatewayCidr: "10.0.0.1/16", mtu: 1500 }]]),
          nics: new Map(records),
        }) as unknown as HostDesired,
      nicRecord: async (id: string) => {
        const n = records.get(id);
        return n ? { nic: n } : ("absent" as const);
      },
    };
    const bind = (n: Nic) =>
      store.bind({ nicId: n.nicId, vpcId: VPC, subnetId: SUBNET, address: n.address, mac: n.mac, hostId: HOST, hostIf: n.hostIf, groupIds: [group.id] });
    const results: Record<string, Record<string, number[]>> = {};
    const levels = [0, NICS];
    let next = 0;
    /** Where the nft applies of the current pass are timed (the delta passes'; the others are dropped). */
    let applyMs: number[] = [];
    for (const level of levels) {
      /** LinuxNft in the namespace (or only the script text), timing each apply. */
      const real = new LinuxNft();
      const nft: NftRunner = {
        apply: async (n, tx) => {
          const t = performance.now();
          if (KERNEL) await real.apply(n, tx);
          else render(tx);
          applyMs.push(performance.now() - t);
        },
        counters: async () => new Map(),
        tableExists: async () => true,
        conntrackList: async () => [],
        conntrackClear: async () => 0,
      };
      const sync = new FirewallSync(nft, store, host, HOST, log, () => true);
      // Fill the host to `level` NICs (beyond the previous level's).
      while (records.size < level) {
        const n = nicOf(next++);
        records.set(n.nicId, spec(n));
        await bind(n);
      }
      await sync.syncAll(true);
      const only = new Set([VPC]);
      const r: Record<string, number[]> = { "whole bind": [], "delta bind": [], "whole unbind": [], "delta unbind": [], "delta apply": [] };
      for (let round = 0; round < ROUNDS * 2; round++) {
        const mode = round % 2 === 0 ? "whole" : "delta";
        applyMs = mode === "delta" ? r["delta apply"] : [];
        const n = nicOf(next++);
        let t = performance.now();
        records.set(n.nicId, spec(n));
        await bind(n);
        if (mode === "delta") sync.noteEvent({ kind: "fw.binding.changed", vpc: VPC, nic: n.nicId, host: HOST, groups: group.id });
        await sync.syncAll(false, false, only);
        r[`${mode} bind`].push(performance.now() - t);
        if (sync.status.lastError) throw new Error(`pass failed: ${sync.status.lastError}`);
        t = performance.now();
        await store.unbind(n.nicId);
        records.delete(n.nicId);
        if (mode === "delta") sync.noteEvent({ kind: "fw.binding.removed", vpc: VPC, nic: n.nicId, host: HOST, groups: group.id });
        await sync.syncAll(false, false, only);
        r[`${mode} unbind`].push(performance.now() - t);
      }
      results[String(level)] = r;
      console.log(`[${level} NICs] ${ROUNDS} rounds of each mode done`);
    }
    const p = (xs: number[], q: number) => percentile(sorted(xs), q);
    const rows: string[][] = [];
    for (const what of ["bind", "unbind", "apply"]) {
      for (const mode of what === "apply" ? ["delta"] : ["whole", "delta"]) {
        const k = `${mode} ${what}`;
        const a = results["0"][k];
        const b = results[String(NICS)][k];
        rows.push([k, `${num(p(a, 50), 2)} / ${num(p(a, 99), 2)}`, `${num(p(b, 50), 2)} / ${num(p(b, 99), 2)}`, `${num(p(b, 50) / p(a, 50), 2)}×`]);
      }
    }
    console.log(heading(`One NIC's change, firewall side (ms, p50 / p99): 0 vs ${NICS} NICs on the host`));
    console.log(table(["change + pass", "0 NICs", `${NICS} NICs`, `${NICS} / 0`], rows));
    const v = (k: string, what: string): Verdict => {
      const a = p(results["0"][k], 50);
      const b = p(results[String(NICS)][k], 50);
      return {
        measure: `${what}, ${NICS} vs 0 NICs (p50)`,
        value: `${num(b, 2)} ms`,
        baseline: `${num(a, 2)} ms`,
        ratio: b / a,
        ...check(b / a, { max: 1.2 }),
      };
    };
    console.log(heading("Verdict"));
    console.log(
      verdictTable([
        v("delta bind", "bind + delta pass"),
        v("delta unbind", "unbind + delta pass"),
        { ...v("delta apply", `the delta's nft apply alone (${KERNEL ? "in the kernel" : "rendered only"})`), target: "", pass: undefined },
        { ...v("whole bind", "bind + whole-VPC pass (before)"), target: "", pass: undefined },
      ]),
    );
    const file = resultsFile("fwdelta");
    writeJson(file, { nics: NICS, rounds: ROUNDS, nft: opt.nft, results });
    console.log(`figures written to ${file}`);
    return 0;
  } finally {
    redis.disconnect();
    await redisSrv.stop();
    if (KERNEL) await deleteNetns(ns);
  }
}

runBench(main);
