// `npm run bench:move`: how long `microvpcd move-to-cluster` keeps the
// control plane stopped (not a timed test). A deployment of N VMs is written
// to one redis-server in the single Redis's names, with the shapes the
// services write (records the move parses are real records; the rest carry
// the sizes and types of theirs): per VPC of 20 VMs its record, a subnet and
// its allocation state, a security group with members, DNS records, client
// tokens, its change stream; per VM its NIC record and address claims, a
// firewall binding and the host's copy of it, a VM record, instance
// metadata; per host of 50 VMs its registry lease and stream; the global
// stream. Then, alternating in each round, on a 3+3 Redis Cluster emptied
// before each:
//   move — moveToCluster (services/migrate/move.ts): snapshot, plan, copy,
//          and the check of every key written;
//   raw  — the baseline: the same keys copied under their own names, SCAN,
//          DUMP and PTTL pipelined from the source, RESTORE on the cluster,
//          in batches of the same size and nothing else: what any copy of
//          this keyspace into a cluster costs.
// Prints the medians, keys per second and move/raw, and writes JSON to
// bench/results/move-<date>.json. Options (after `npm run bench:move --`):
// --vms LIST (default 1000,10000), --rounds N (default 3). --smoke: 60 VMs,
// one round.
import type { Cluster, Redis } from "ioredis";
import { connectRedis, waitReady } from "../services/common/redis.js";
import { moveToCluster } from "../services/migrate/move.js";
import { startRedis, startRedisCluster } from "../test/lib/redis.js";
import { heading, num, resultsFile, table, verdictTable, writeJson, type Verdict } from "./lib/report.js";
import { benchArgs, benchClock, intOpt, runBench } from "./lib/run.js";
import { percentile, sorted } from "./lib/stats.js";

const args = benchArgs({ vms: { type: "string", default: "1000,10000" }, rounds: { type: "string", default: "3" } }, { vms: "60", rounds: "1" });
const NS = String(args.vms)
  .split(",")
  .map((x) => intOpt("vms", x, 20, 200_000));
const ROUNDS = intOpt("rounds", args.rounds, 1, 20);
const { progress } = benchClock(30 * 60_000);
const BATCH = 256;

const hex12 = (kind: string, n: number) => `${kind}-${(0xa00000000000 + n).toString(16)}`;

/** Writes a deployment of n VMs in the single Redis's names; returns the number of keys. */
async function populate(r: Redis, n: number): Promise<number> {
  let p = r.pipeline();
  const flush = async (force = false) => {
    if (!force && p.length < 2000) return;
    await p.exec();
    p = r.pipeline();
  };
  const vpcs = Math.ceil(n / 20);
  for (let v = 0; v < vpcs; v++) {
    const V = hex12("vpc", v);
    const S = hex12("subnet", v);
    const G = hex12("sg", v);
    const base = (10 << 24) + ((v % 250) << 16);
    const cidr = `10.${v % 250}.0.0/16`;
    p.hset(`mvpc:vpc:${V}`, { id: V, name: `vpc${v}`, cidr, base: String(base), prefix: "16", created: "1700000000000", labels: "[]", description: "" });
    p.zadd("mvpc:vpcs", 0, `vpc${v}`);
    p.hset("mvpc:vpc:byname", `vpc${v}`, V);
    p.zadd(`mvpc:vpc:${V}:subnets`, base + 256, S);
    p.hset(`mvpc:vpc:${V}:subnet:byname`, "web", S);
    const subnet = {
      id: S,
      vpc: V,
      name: "web",
      cidr: `10.${v % 250}.1.0/24`,
      base: String(base + 256),
      prefix: "24",
      size: "256",
      type: "private",
      extra: "0",
      created: "1",
    };
    p.hset(`mvpc:subnet:${S}`, subnet);
    p.zadd("mvpc:subnets", 0, S);
    for (const part of ["bits", "full", "used"]) p.set(`mvpc:{${V}}:sn:${S}:${part}`, "x".repeat(32));
    p.hset(`mvpc:fw:sg:${G}`, {
      id: G,
      vpc: V,
      name: "web",
      rules: "[]",
      gen: "1",
      created: "1",
      updated: "1",
    });
    p.hset(`mvpc:fw:vpc:${V}:sg:byname`, "web", G);
    p.zadd(`mvpc:fw:vpc:${V}:sgs`, 0, `web/${G}`);
    p.zadd("mvpc:fw:sgs", 0, `web/${G}`);
    p.hset("mvpc:tokens", `vpc\nt${v}`, V, `subnet\nt${v}`, S, `sg\nt${v}`, G);
    for (let e = 0; e < 50; e++) p.xadd(`mvpc:{${V}}:events`, "*", "kind", "nic.attached", "vpc", V, "nic", hex12("nic", v * 20 + (e % 20)));
    await flush();
  }
  for (let i = 0; i < n; i++) {
    const v = Math.floor(i / 20);
    const V = hex12("vpc", v);
    const S = hex12("subnet", v);
    const G = hex12("sg", v);
    const H = `hv${Math.floor(i / 50)}`;
    const N = hex12("nic", i);
    const VM = hex12("vm", i);
    const addr = `10.${v % 250}.1.${(i % 20) + 10}`;
    const nic = { id: N, vpcId: V, subnetId: S, address: addr, mac: "02:00:00:00:00:01", ifname: `tap${i}`, mtu: 1500, ns: `/run/netns/vm${i}`, createdMs: 1 };
    p.hset(`mvpc:host:${H}:nics`, N, JSON.stringify(nic));
    p.hset(`mvpc:host:${H}:nicaddr`, `${V}/${addr}`, N);
    p.hset(`mvpc:host:${H}:vpcs`, V, JSON.stringify({ vpcId: V, ns: `mvpc-${H}-${V}`, createdMs: 1 }));
    p.hset("mvpc:nicaddr", `${V}/${addr}`, `${H}/${N}`);
    p.hset(`mvpc:{${V}}:sn:${S}:alloc`, String(i % 20), `${VM}\nreq${i}\n1700000000000`);
    p.hset(`mvpc:fw:sg:${G}:members`, N, addr);
    const sig = JSON.stringify({ nic: N, host: H, vpc: V, subnet: S, addr, groups: [G], ifname: `tap${i}`, mac: "02:00:00:00:00:01" });
    p.hset(`mvpc:fw:nic:${N}`, { sig, host: H, vpc: V, subnet: S, addr, groups: G, bound: "1", updated: "1" });
    p.hset(`mvpc:fw:host:${H}:sig`, N, sig);
    p.zadd(`mvpc:fw:vpc:${V}:nics`, 0, N);
    p.zadd(`mvpc:fw:host:${H}:nics`, 0, N);
    p.zadd("mvpc:fw:nics", 0, N);
    p.hset(`mvpc:dns:vpc:${V}:rec`, `vm${i}`, JSON.stringify({ name: `vm${i}`, address: addr, ttl: 60, owner: VM, updatedMs: 1 }));
    p.hset(`mvpc:{host:${H}}:vm:${VM}`, {
      rec: JSON.stringify({
        id: VM,
        name: `vm${i}`,
        vpcId: V,
        subnetId: S,
        state: "running",
        nics: [nic],
        steps: Array(6).fill({ name: "step", detail: "x".repeat(60) }),
      }),
    });
    p.zadd(`mvpc:{host:${H}}:vms`, 0, VM);
    p.hset(`mvpc-md:{host:${H}}:inst:${VM}`, { vpc: V, address: addr, userdata: "x".repeat(200), hostname: `vm${i}` });
    if (i % 50 === 0) {
      p.set(`mvpc:hosts:${H}`, JSON.stringify({ id: H, publicKey: "K".repeat(43) + "=", address: "192.0.2.1", mtu: 1420 }), "PX", 3_600_000);
      for (let e = 0; e < 50; e++) p.xadd(`mvpc:{host:${H}}:events`, "*", "kind", "vm.updated", "vm", VM);
    }
    await flush();
  }
  for (let e = 0; e < 1000; e++) p.xadd("mvpc:events", "MAXLEN", "~", 100000, "*", "kind", "vm.updated", "vm", hex12("vm", e));
  p.set("mvpc:fw:gen", "1234");
  await flush(true);
  return r.dbsize();
}

async function emptyCluster(c: Redis): Promise<void> {
  await Promise.all((c as unknown as Cluster).nodes("master").map((n) => n.flushall()));
}

/** The baseline: every key under its own name, DUMP/PTTL from the source, RESTORE on the cluster, same batches. */
async function rawCopy(src: Redis, dst: Redis): Promise<number> {
  let cursor = "0";
  let n = 0;
  do {
    const [next, keys] = await src.scan(cursor, "MATCH", "mvpc*", "COUNT", 1000);
    cursor = next;
    for (let i = 0; i < keys.length; i += BATCH) {
      const chunk = keys.slice(i, i + BATCH);
      const p = src.pipeline();
      for (const k of chunk) p.dumpBuffer(k).pttl(k);
      const res = (await p.exec()) ?? [];
      await Promise.all(chunk.map((k, j) => dst.restore(k, Math.max(0, res[2 * j + 1][1] as number), res[2 * j][1] as Buffer)));
      n += chunk.length;
    }
  } while (cursor !== "0");
  return n;
}

async function main(): Promise<number> {
  progress("starting one redis-server and a 3+3 Redis Cluster");
  const single = await startRedis({ persistence: false });
  const cluster = await startRedisCluster().catch(async (e: unknown) => {
    await single.stop();
    throw e;
  });
  const src = connectRedis({ url: single.url, commandTimeoutMs: 60_000 });
  const dst = connectRedis({ url: cluster.url, commandTimeoutMs: 60_000 });
  const rows: { vms: number; keys: number; moveMs: number[]; rawMs: number[]; written: number }[] = [];
  try {
    await Promise.all([waitReady(src), waitReady(dst)]);
    for (const n of NS) {
      await src.flushall();
      const keys = await populate(src, n);
      progress(`${n} VMs: ${keys} keys on the redis-server`);
      const row = { vms: n, keys, moveMs: [] as number[], rawMs: [] as number[], written: 0 };
      for (let r = 0; r < ROUNDS; r++) {
        for (const which of r % 2 ? ["raw", "move"] : ["move", "raw"]) {
          await emptyCluster(dst);
          const t = performance.now();
          if (which === "raw") await rawCopy(src, dst);
          else {
            // ignoreClients: the only other clients are this bench's own two connections, idle.
            const rep = await moveToCluster({ from: single.url, to: cluster.url, ignoreClients: true, say: () => undefined });
            row.written = rep.written;
          }
          (which === "raw" ? row.rawMs : row.moveMs).push(performance.now() - t);
        }
        progress(`${n} VMs, round ${r + 1}: move ${num(row.moveMs.at(-1)!, 0)} ms, raw ${num(row.rawMs.at(-1)!, 0)} ms`);
      }
      rows.push(row);
    }
  } finally {
    src.disconnect();
    dst.disconnect();
    await cluster.stop();
    await single.stop();
  }
  const med = (xs: number[]) => percentile(sorted(xs), 50);
  console.log(heading(`move-to-cluster vs a raw copy of the same keys (${ROUNDS} round(s), medians)`));
  console.log(
    table(
      ["VMs", "keys read", "keys written", "move ms", "raw ms", "move keys/s", "move/raw"],
      rows.map((r) => [
        String(r.vms),
        String(r.keys),
        String(r.written),
        num(med(r.moveMs), 0),
        num(med(r.rawMs), 0),
        num((r.keys / med(r.moveMs)) * 1000, 0),
        (med(r.moveMs) / med(r.rawMs)).toFixed(2) + "×",
      ]),
    ),
  );
  const verdicts: Verdict[] = rows.map((r) => ({
    measure: `move of ${r.vms} VMs (control plane stopped)`,
    value: `${num(med(r.moveMs), 0)} ms`,
    baseline: `${num(med(r.rawMs), 0)} ms raw copy`,
    ratio: med(r.moveMs) / med(r.rawMs),
    target: "",
  }));
  console.log(heading("Verdict"));
  console.log(verdictTable(verdicts));
  const file = resultsFile("move");
  writeJson(file, { rounds: ROUNDS, rows });
  console.log(`figures written to ${file}`);
  return 0;
}

runBench(main);
