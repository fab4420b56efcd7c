// The firewall's tables as the netagent installs them in a new VPC namespace,
// before the firewall has compiled anything (services/firewall/compile.ts
// replaces them). Here so the netagent needs nothing of the firewall's code.
import { NftTransaction, type TableItem } from "./tx.js";

/** The firewall's table name, in the inet and the bridge family. */
export const FIREWALL_TABLE = "microvpc";

/**
 * What the netagent installs in a VPC namespace it creates, before any
 * bridge or NIC exists (fail closed): the firewall's two tables, each with
 * one chain that drops everything forwarded, routed or bridged. The
 * firewall's first pass replaces both tables in its one transaction; until
 * then nothing is forwarded, so a VPC never runs open or unspoofed because
 * the firewall is late or down. The chain is not called "forward", so the
 * firewall's drift check (LinuxNft.tableExists) never takes it for its own.
 */
export function failClosedTx(): NftTransaction {
  const closed: TableItem = { kind: "chain", name: "closed", base: { type: "filter", hook: "forward", priority: "filter", policy: "drop" }, rules: [] };
  return new NftTransaction()
    .add({ kind: "table", family: "inet", name: FIREWALL_TABLE, content: [closed] })
    .add({ kind: "table", family: "bridge", name: FIREWALL_TABLE, content: [closed] });
}
