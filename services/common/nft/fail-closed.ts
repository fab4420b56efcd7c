// The firewall's tables as the netagent installs them in a new VPC namespace,
// before the firewall has compiled anything (services/firewall/compile.ts
// replaces them). Here so the netagent needs nothing of the firewall's code.
import { NftTransaction } from "./tx.js";

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
 *
 * The tables are *created*, not added: if the firewall's pass got into the
 * namespace between its creation and this transaction (it follows the VPC's
 * feed, which a host joins as the namespace is made), the whole transaction
 * fails ("File exists") and changes nothing. Added, its chain would have
 * joined the firewall's table and dropped every packet of the VPC until the
 * next full replace, while the firewall's element updates went on beside it.
 * The netagent takes that failure for success when firewallTablesIntact
 * reads the firewall's table.
 */
export function failClosedTx(): NftTransaction {
  const tx = new NftTransaction();
  for (const family of ["inet", "bridge"] as const) {
    tx.create({ kind: "table", family, name: FIREWALL_TABLE }).add({
      kind: "chain",
      family,
      table: FIREWALL_TABLE,
      name: CLOSED_CHAIN,
      base: { type: "filter", hook: "forward", priority: "filter", policy: "drop" },
    });
  }
  return tx;
}

/** The skeleton's chain: in the firewall's own table it can only be a skeleton merged into it (drift). */
export const CLOSED_CHAIN = "closed";

/**
 * The firewall's drift check over `nft -j list chains` (null: no chains),
 * and the netagent's check, over `nft -j list table inet microvpc`, that a
 * skeleton refused as "File exists" met the firewall's tables:
 * its tables are there as only it makes them — inet microvpc with its
 * forward chain, and no skeleton chain in either table. A skeleton merged
 * into them (a netagent from before failClosedTx created its tables, or
 * anything else that added the chain) drops every forwarded packet, so it
 * counts as drift: the next pass replaces the tables.
 */
export function firewallTablesIntact(chains: unknown[] | null): boolean {
  let own = false;
  for (const x of chains ?? []) {
    const c = (x as { chain?: { family?: unknown; table?: unknown; name?: unknown } }).chain;
    if (c?.table !== FIREWALL_TABLE) continue;
    if (c.name === CLOSED_CHAIN) return false;
    if (c.family === "inet" && c.name === "forward") own = true;
  }
  return own;
}
