// Simulated hypervisors and VMs for the data-plane tests (this issue and the
// later ones reuse it).
//
// A Harness is: one real redis-server, one ipam daemon, and N simulated
// hypervisors. Each hypervisor is a real `microvpcd netagent` with its own
// --host-id (`<prefix>hv<i>`), started in the root namespace (it only manages
// named namespaces: `mvpc-<hostId>-<vpcId>`), plus a "host" namespace
// (`<prefix>-hv<i>`) joined to an "underlay" namespace (`<prefix>-ul`, a
// bridge) by a veth with a 192.168.100.x address — where later issues put
// WireGuard endpoints and NAT uplinks. A VM is a namespace
// (`<prefix>-vm-<name>`) whose eth0 is the far end of a kind=veth NIC.
//
// Everything carries the run prefix and is removed by close(), and also on
// process exit, SIGINT and SIGTERM (see netns.ts). The root namespace is only
// read (rootSnapshot) so a test can check it was not changed.
import { execFileSync, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { Redis } from "ioredis";
import type { Client } from "@connectrpc/connect";
import { SubnetType, type Subnet } from "../../gen/microvpc/v1/subnet_pb.js";
import type { Vpc } from "../../gen/microvpc/v1/vpc_pb.js";
import type { MessageInitShape } from "@bufbuild/protobuf";
import { NetAgentService, NicKind, type BandwidthLimitSchema, type Nic } from "../../gen/microvpc/v1/netagent_pb.js";
import { grpcClient } from "../../services/common/client.js";
import { connectRedis } from "../../services/common/redis.js";
import { interfacesIn } from "../../services/netagent/overlay/wg.js";
import { ipamClients } from "./clients.js";
import { ROOT, startDaemon, type Daemon, type DaemonOptions } from "./daemon.js";
import { CONTROL_USER, hostUser } from "../../services/common/redis-acl.js";
import {
  cleanupSync,
  createNetns,
  deleteNetns,
  diffRoot,
  installCleanupHandlers,
  ipn,
  links,
  listening,
  listNetns,
  netnsPath,
  onCleanup,
  ownedNamespace,
  redisUrlIn,
  rootSnapshot,
  RUN_PREFIX,
  sweepStale,
  tempDir,
  trackChild,
  vethBetween,
  type LinkInfo,
  type RootSnapshot,
} from "./netns.js";
import { ON_CLUSTER } from "./on-cluster.js";
import { startRedis, startRedisCluster, whenReady, type TestRedis, type TestRedisCluster, type TestRedisClusterNode } from "./redis.js";

export type NetAgentClient = Client<typeof NetAgentService>;

export interface HarnessOptions {
  /** Number of simulated hypervisors. Default 1. */
  hosts?: number;
  /** Extra flags for every netagent (e.g. ["--reconcile-interval-ms", "1000"]). */
  agentArgs?: string[];
  /**
   * Agents make VPC namespaces that forward nothing until a firewall applies,
   * as in production. Default false: most data-plane tests run no firewall,
   * so their agents get `--open-until-firewall`.
   */
  failClosed?: boolean;
  /** Extra flags for the ipam daemon (e.g. ["--management-cidrs", MANAGEMENT_CIDRS]). */
  ipamArgs?: string[];
  /** Build the underlay and the host namespaces. Default true. */
  underlay?: boolean;
  /**
   * Run on a Redis Cluster (3 primaries, 3 replicas) instead of one
   * redis-server. Default:
   * ON_CLUSTER (a test file that imports set-on-cluster.ts first). With
   * redisAcl, every node (replicas too: ACLs are not replicated) gets the
   * users, and the nodes' default user the admin password (requirepass, and
   * masterauth for the replicas). hostServices works: the gateway's metadata
   * server, in the hypervisor's namespace, reaches the nodes' loopback ports
   * through forwards to their unix sockets (redisFrom).
   */
  cluster?: boolean;
  /**
   * Join the hypervisors with the WireGuard overlay: every agent gets
   * `--overlay --host-netns <its host namespace> --underlay-interface ul0
   * --state-dir <a temp dir of the run>`. Needs the underlay.
   */
  overlay?: boolean;
  /**
   * Per-host Redis ACL users, as docs/redis-acl.md deploys them: Redis's
   * default user gets a password only the test knows (`redisAcl.admin`), the
   * users come from `microvpcd redis-acl` (its output applied as is), ipam
   * runs as microvpc-control and every host's daemons as
   * microvpc-host-<host id>, each with its own password file. On a cluster
   * too (every node gets the users). The test's own connections: connect().
   */
  redisAcl?: boolean;
}

/** With HarnessOptions.redisAcl: who is who in Redis. */
export interface RedisAclSetup {
  /** Password of Redis's default user (the test's own connections). */
  admin: string;
  /** Password file of a user (microvpc-control, microvpc-host-<id>). */
  passwordFile(user: string): string;
  /** Daemon flags to connect as that user. */
  args(user: string): string[];
}

/** The underlay subnet joining the host namespaces. */
export const UNDERLAY_CIDR = "192.168.100.0/24";
/** Address of the underlay bridge in the underlay namespace. */
export const UNDERLAY_GATEWAY = "192.168.100.1";
/** The "internet" namespace's address on the underlay. */
export const INTERNET_ADDRESS = "192.168.100.200";
/** Floating IPs the gateway hands out in tests: on the underlay, answered by proxy ARP. */
export const FLOATING_POOL = "192.168.100.128/26";
/**
 * The management part of the test underlay (the hypervisors' 192.168.100.1x,
 * the underlay gateway), given to gateways as --management-cidrs: "auto"
 * would take all of 192.168.100.0/24, where the tests' "internet" lives too.
 */
export const MANAGEMENT_CIDRS = "192.168.100.0/25";

const WHOAMI_SERVER = `require("node:http").createServer((q, r) => r.end(q.socket.remoteAddress.replace(/^::ffff:/, ""))).listen(80, "0.0.0.0")`;

export class Hypervisor {
  daemon!: Daemon;
  agent!: NetAgentClient;
  /** Address of the host namespace on the underlay (192.168.100.x). */
  readonly underlayAddress: string;

  constructor(
    readonly index: number,
    /** The hypervisor id given to netagent: `<prefix>hv<i>`. */
    readonly id: string,
    /** The host namespace: `<prefix>-hv<i>` (underlay side of this hypervisor). */
    readonly ns: string,
    private redisUrl: string,
    private readonly agentArgs: string[],
  ) {
    this.underlayAddress = `192.168.100.${10 + index}`;
  }

  /** Starts (or starts again, e.g. after kill()) this hypervisor's netagent. */
  async start(): Promise<void> {
    this.daemon = await startDaemon("netagent", ["--redis", this.redisUrl, "--host-id", this.id, ...this.agentArgs]);
    trackChild(this.daemon.proc);
    this.agent = grpcClient(NetAgentService, { address: this.daemon.address, timeoutMs: 30_000 });
  }

  /** The Redis the next start() gives the agent (Harness.moveToCluster). */
  useRedis(url: string): void {
    this.redisUrl = url;
  }

  /** SIGKILLs the agent (a crash) and waits until it is gone. */
  async kill(): Promise<void> {
    const p = this.daemon.proc;
    if (p.exitCode !== null || p.signalCode !== null) return;
    const exited = new Promise((res) => p.once("exit", res));
    p.kill("SIGKILL");
    await exited;
  }

  /** Stops the agent gracefully (SIGTERM; SIGKILL after 5 s). */
  async stop(): Promise<void> {
    await this.daemon?.stop();
  }

  /** Name of the VPC's namespace on this host. */
  vpcNamespace(vpcId: string): string {
    return `mvpc-${this.id}-${vpcId}`;
  }

  /** Namespaces netagent made for this host. */
  async vpcNamespaces(): Promise<string[]> {
    return (await listNetns()).filter((n) => n.startsWith(`mvpc-${this.id}-`)).sort();
  }
}

export interface Vm {
  name: string;
  /** The VM's namespace. */
  ns: string;
  nsPath: string;
  host: Hypervisor;
  vpc: Vpc;
  subnet: Subnet;
  address: string;
  gateway: string;
  mac: string;
  owner: string;
  nicId: string;
  /** Host-side interface of the NIC in the VPC namespace. */
  hostInterface: string;
  /** The VPC namespace holding the host side. */
  vpcNs: string;
  nic: Nic;
}

/** The BindNic request that binds a harness VM's NIC to `securityGroups` on its host's firewall. */
export function bindRequest(vm: Vm, securityGroups: string[]) {
  return {
    nicId: vm.nicId,
    vpc: vm.vpc.id,
    subnet: vm.subnet.id,
    address: vm.address,
    mac: vm.mac,
    hostInterface: vm.hostInterface,
    securityGroups,
  };
}

export interface VmOptions {
  /** Wanted address (allocated in IPAM with it). */
  address?: string;
  mac?: string;
  mtu?: number;
  bandwidth?: MessageInitShape<typeof BandwidthLimitSchema>;
  /** Skip EnsureVpc/EnsureSubnet (AttachNic ensures them itself). */
  attachOnly?: boolean;
  clientToken?: string;
}

const VM_NAME_RE = /^[a-z0-9][a-z0-9-]{0,30}$/;

/** --drift-interval-ms of a firewall or gateway, if given. */
const driftArgs = (ms: number | undefined): string[] => (ms === undefined ? [] : ["--drift-interval-ms", String(ms)]);

/** Redis processes of a run: ended (SIGKILL) and their directories removed with the run, also on failure. */
function trackRedisNodes(nodes: Pick<TestRedisClusterNode, "proc" | "dir">[]): void {
  for (const node of nodes) {
    trackChild(node.proc);
    onCleanup(() => {
      if (node.proc.exitCode === null && node.proc.signalCode === null) node.proc.kill("SIGKILL");
      rmSync(node.dir, { recursive: true, force: true });
    });
  }
}

export class Harness {
  readonly prefix = RUN_PREFIX;
  redis!: TestRedis;
  /** With `cluster`: the Redis Cluster, whose URL every daemon gets (redis is then unset). */
  redisCluster?: TestRedisCluster;
  ipamDaemon!: Daemon;
  ipam!: ReturnType<typeof ipamClients>;
  hosts: Hypervisor[] = [];
  /** The underlay namespace (a bridge joining the host namespaces). */
  readonly underlayNs = `${RUN_PREFIX}-ul`;
  /** The root namespace as it was before the harness did anything. */
  rootBefore!: RootSnapshot;
  readonly vms = new Map<string, Vm>();
  /** With overlay: the agents' --state-dir (keys in <dir>/<hostId>/wg.key). */
  stateDir?: string;
  private closed = false;

  private constructor(private readonly opts: HarnessOptions) {}

  private get onCluster(): boolean {
    return this.redisCluster !== undefined || (this.opts.cluster ?? ON_CLUSTER);
  }

  /** The URL every daemon of the run gets: the redis-server's, or the cluster's. */
  get redisUrl(): string {
    return this.redisCluster?.url ?? this.redis.url;
  }

  static async start(opts: HarnessOptions = {}): Promise<Harness> {
    installCleanupHandlers();
    sweepStale();
    const h = new Harness(opts);
    try {
      await h.init();
    } catch (e) {
      await h.close().catch(() => undefined);
      throw e;
    }
    return h;
  }

  private async init(): Promise<void> {
    this.rootBefore = await rootSnapshot();
    const admin = this.opts.redisAcl ? randomBytes(16).toString("hex") : undefined;
    const procs: Pick<TestRedisClusterNode, "proc" | "dir">[] = [];
    if (this.onCluster) {
      this.redisCluster = await startRedisCluster({ password: admin });
      procs.push(...this.redisCluster.nodes);
    } else {
      this.redis = await startRedis({ appendfsync: "no", password: admin });
      procs.push(this.redis);
    }
    trackRedisNodes(procs);
    const n = this.opts.hosts ?? 1;
    if (n < 1 || n > 20) throw new Error(`hosts: ${n}; use 1–20`);
    if (admin) this.acl = await this.aclUsers(admin, n);
    this.ipamDaemon = await startDaemon("ipam", ["--redis", this.redisUrl, ...this.redisAuth(CONTROL_USER), ...(this.opts.ipamArgs ?? [])]);
    trackChild(this.ipamDaemon.proc);
    this.ipam = ipamClients(this.ipamDaemon.address);
    if (this.opts.overlay && this.opts.underlay === false) throw new Error("overlay needs the underlay");
    if (this.opts.overlay) {
      this.stateDir = tempDir("state");
      const dir = this.stateDir;
      const ids = Array.from({ length: n }, (_, i) => `${this.prefix}hv${i}`);
      // wireguard-go runs in the host namespaces (ended with them), but its
      // control socket /var/run/wireguard/NAME.sock is global: end our
      // processes by PID and remove their sockets.
      onCleanup(() => {
        for (const id of ids) {
          for (const { ifname, pid } of interfacesIn(dir, id)) {
            try {
              if (pid > 0 && readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").includes(ifname)) process.kill(pid, "SIGKILL");
            } catch {
              // gone
            }
            rmSync(`/var/run/wireguard/${ifname}.sock`, { force: true });
          }
        }
      });
    }
    if (this.opts.underlay ?? true) {
      await createNetns(this.underlayNs);
      const ul = this.underlayNs;
      await ipn(ul, ["link", "add", "ul0", "type", "bridge"]);
      await ipn(ul, ["addr", "add", `${UNDERLAY_GATEWAY}/24`, "dev", "ul0"]);
      await ipn(ul, ["link", "set", "ul0", "up"]);
      for (let i = 0; i < n; i++) {
        const hostNs = await createNetns(`${this.prefix}-hv${i}`);
        // Odd hosts find their underlay interface themselves (auto: the default route's, ul0).
        const ulIf = i % 2 === 1 ? "auto" : "ul0";
        const overlayArgs = this.opts.overlay ? ["--overlay", "--host-netns", hostNs, "--underlay-interface", ulIf, "--state-dir", this.stateDir!] : [];
        const hv = new Hypervisor(i, `${this.prefix}hv${i}`, hostNs, this.redisUrl, [...overlayArgs, ...this.agentArgs(`${this.prefix}hv${i}`)]);
        await vethBetween({ ns: hostNs, name: "ul0", address: `${hv.underlayAddress}/24` }, { ns: ul, name: `hv${i}` });
        await ipn(ul, ["link", "set", `hv${i}`, "master", "ul0"]);
        await ipn(hostNs, ["route", "add", "default", "via", UNDERLAY_GATEWAY]);
        this.hosts.push(hv);
      }
    } else {
      for (let i = 0; i < n; i++)
        this.hosts.push(new Hypervisor(i, `${this.prefix}hv${i}`, `${this.prefix}-hv${i}`, this.redisUrl, this.agentArgs(`${this.prefix}hv${i}`)));
    }
    await Promise.all(this.hosts.map((hv) => hv.start()));
  }

  host(h: Hypervisor | number): Hypervisor {
    if (typeof h !== "number") return h;
    const hv = this.hosts[h];
    if (!hv) throw new Error(`no hypervisor ${h}`);
    return hv;
  }

  /** Creates a VPC in the catalog (IPAM). */
  async vpc(name: string, cidr: string): Promise<Vpc> {
    return (await this.ipam.vpc.createVpc({ name, cidr })).vpc!;
  }

  /** Creates a subnet in the catalog (IPAM). */
  async subnet(vpc: Vpc | string, name: string, cidr: string, type: SubnetType = SubnetType.PRIVATE): Promise<Subnet> {
    return (await this.ipam.subnet.createSubnet({ vpc: typeof vpc === "string" ? vpc : vpc.id, name, cidr, type })).subnet!;
  }

  /** Allocates an address for owner in IPAM (the wanted one if given). */
  async allocate(subnet: Subnet, owner: string, address?: string): Promise<string> {
    return (await this.ipam.ipam.allocate({ subnetId: subnet.id, owner, requestId: owner, address })).allocation!.address;
  }

  /**
   * A VM: its namespace, an address from IPAM, EnsureVpc + EnsureSubnet +
   * AttachNic(kind=veth into the namespace) on the given hypervisor.
   */
  async vm(host: Hypervisor | number, vpc: Vpc, subnet: Subnet, name: string, o: VmOptions = {}): Promise<Vm> {
    if (!VM_NAME_RE.test(name)) throw new Error(`VM name ${JSON.stringify(name)}: use [a-z0-9-], at most 31`);
    if (this.vms.has(name)) throw new Error(`VM ${name} exists`);
    const hv = this.host(host);
    const ns = await createNetns(`${this.prefix}-vm-${name}`);
    const owner = `vm-${name}`;
    const address = await this.allocate(subnet, owner, o.address);
    if (!o.attachOnly) {
      await hv.agent.ensureVpc({ vpc: vpc.id });
      await hv.agent.ensureSubnet({ subnet: subnet.id, vpc: vpc.id });
    }
    const r = await hv.agent.attachNic({
      vpc: vpc.id,
      subnet: subnet.id,
      kind: NicKind.VETH,
      options: { case: "veth", value: { netnsPath: netnsPath(ns) } },
      address,
      mac: o.mac,
      mtu: o.mtu,
      bandwidth: o.bandwidth,
      owner,
      guestInterface: "eth0",
      hostname: name,
      clientToken: o.clientToken,
    });
    const nic = r.nic!;
    const vm: Vm = {
      name,
      ns,
      nsPath: netnsPath(ns),
      host: hv,
      vpc,
      subnet,
      address,
      gateway: subnet.gateway,
      mac: nic.guest?.mac ?? "",
      owner,
      nicId: nic.id,
      hostInterface: nic.hostInterface,
      vpcNs: hv.vpcNamespace(vpc.id),
      nic,
    };
    this.vms.set(name, vm);
    return vm;
  }

  /** DetachNic, release the address, delete the VM's namespace. */
  async removeVm(vm: Vm): Promise<void> {
    await vm.host.agent.detachNic({ nic: vm.nicId });
    await this.ipam.ipam.release({ subnetId: vm.subnet.id, address: vm.address });
    await deleteNetns(vm.ns);
    this.vms.delete(vm.name);
  }

  /**
   * The "internet": a namespace on the underlay (192.168.100.200) running an
   * HTTP server that answers with the source address it sees. Hypervisors
   * reach it through their uplink (ul0); it reaches VMs only through
   * floating IPs and port forwards.
   */
  /** Flags of every netagent: the test's, --open-until-firewall unless failClosed, its Redis user with redisAcl. */
  private agentArgs(hostId: string): string[] {
    return [...(this.opts.failClosed ? [] : ["--open-until-firewall"]), ...this.redisAuth(hostUser(hostId)), ...(this.opts.agentArgs ?? [])];
  }

  /** With redisAcl: the users and their password files (undefined otherwise). */
  acl?: RedisAclSetup;

  /** --redis-user/--redis-password-file of this user with redisAcl, else nothing. */
  private redisAuth(user: string): string[] {
    return this.acl ? this.acl.args(user) : [];
  }

  /**
   * A client of the run's Redis (the redis-server or the cluster, in its
   * layout: connectRedis), as `user` with redisAcl (its password file), or
   * as Redis's default user (with redisAcl, the admin password). The caller
   * disconnects it.
   */
  connect(user?: string, o: { commandTimeoutMs?: number } = {}): Redis {
    const auth = user
      ? { username: user, password: readFileSync(this.requireAcl().passwordFile(user), "utf8").replace(/\r?\n$/, "") }
      : this.acl
        ? { password: this.acl.admin }
        : {};
    return connectRedis({ url: this.redisUrl, commandTimeoutMs: o.commandTimeoutMs ?? 5000, ...auth });
  }

  /** connect(), once the client is ready (its first command would not fail for a connection still under way). */
  connectReady(user?: string, o: { commandTimeoutMs?: number } = {}): Promise<Redis> {
    return whenReady(this.connect(user, o));
  }

  private requireAcl(): RedisAclSetup {
    if (!this.acl) throw new Error("Harness: Redis users need redisAcl");
    return this.acl;
  }

  /**
   * Creates the control user and one user per host with `microvpcd redis-acl`,
   * each with its own password, on the redis-server or on every node of the
   * cluster (ACL rules are per node: a replica promoted by a failover must
   * know the users too).
   */
  private async aclUsers(admin: string, n: number): Promise<RedisAclSetup> {
    const dir = tempDir("redis-acl");
    const files = new Map<string, string>();
    const ports = this.redisCluster ? this.redisCluster.nodes.map((node) => node.port) : [this.redis.port];
    const conns = ports.map((port) => new Redis({ port, host: "127.0.0.1", password: admin, maxRetriesPerRequest: 0 }));
    try {
      const who = [["--control"], ...Array.from({ length: n }, (_, i) => ["--host-id", `${this.prefix}hv${i}`])];
      for (const w of who) {
        const user = w[0] === "--control" ? CONTROL_USER : hostUser(w[1]);
        const file = join(dir, user);
        writeFileSync(file, randomBytes(16).toString("hex") + "\n", { mode: 0o600 });
        files.set(user, file);
        const line = execFileSync(process.execPath, [join(ROOT, "bin", "microvpcd.js"), "redis-acl", ...w, "--password-file", file], {
          encoding: "utf8",
        }).trim();
        const [acl, setuser, ...rest] = line.split(" ");
        if (acl !== "ACL" || setuser !== "SETUSER") throw new Error(`microvpcd redis-acl printed ${JSON.stringify(line)}`);
        await Promise.all(conns.map((c) => c.call("ACL", "SETUSER", ...rest)));
      }
    } finally {
      for (const c of conns) c.disconnect();
    }
    const passwordFile = (user: string) => {
      const f = files.get(user);
      if (!f) throw new Error(`no Redis user ${user}`);
      return f;
    };
    return { admin, passwordFile, args: (user) => ["--redis-user", user, "--redis-password-file", passwordFile(user)] };
  }

  async internet(): Promise<{ ns: string; address: string }> {
    if (this.inet) return this.inet;
    const ns = await createNetns(`${this.prefix}-inet`);
    await vethBetween({ ns, name: "eth0", address: `${INTERNET_ADDRESS}/24` }, { ns: this.underlayNs, name: "inet" });
    await ipn(this.underlayNs, ["link", "set", "inet", "master", "ul0"]);
    const child = trackChild(
      spawn("ip", ["netns", "exec", ns, process.execPath, "-e", WHOAMI_SERVER], { stdio: "ignore", env: { ...process.env, LC_ALL: "C" } }),
    );
    for (let i = 0; i < 100 && !(await listening(ns, 80)); i++) await new Promise((r) => setTimeout(r, 50));
    if (child.exitCode !== null) throw new Error("internet http server exited");
    this.inet = { ns, address: INTERNET_ADDRESS };
    return this.inet;
  }
  private inet?: { ns: string; address: string };

  /**
   * Starts the per-host daemons next to a hypervisor's netagent, as a
   * hypervisor runs them: firewall, gateway (always with --host-netns, the
   * hypervisor's namespace, uplink ul0 and the floating pool) and, with
   * `vmm`, the vmm wired to all of them. Tracked: ended with the run.
   */
  async hostServices(
    host: Hypervisor | number = 0,
    o: { vmm?: boolean; driftMs?: number; firewallArgs?: string[]; gatewayArgs?: string[]; vmmArgs?: string[]; vmmEnv?: Record<string, string> } = {},
  ): Promise<{ fwd: Daemon; gwd: Daemon; vmmd?: Daemon }> {
    const hv = this.host(host);
    const fwd = await this.firewall(hv, { driftMs: o.driftMs, args: o.firewallArgs });
    const gwd = await startDaemon("gateway", [...(await this.gatewayFlags(hv)), ...driftArgs(o.driftMs), ...(o.gatewayArgs ?? [])]);
    trackChild(gwd.proc);
    if (!o.vmm) return { fwd, gwd };
    const vmmd = await this.vmm(hv, { fwd, gwd, args: o.vmmArgs, env: o.vmmEnv });
    return { fwd, gwd, vmmd };
  }

  /**
   * Starts a vmm for a hypervisor, as hostServices does: its Redis, host id
   * and Redis user, wired to ipam, the hypervisor's netagent and the given
   * firewall and gateway; then `args`, with `env` and the daemon options `daemon`
   * (node flags). Tracked: ended with the run.
   */
  async vmm(
    host: Hypervisor | number,
    o: { fwd: Daemon; gwd: Daemon; args?: string[]; env?: Record<string, string>; daemon?: DaemonOptions },
  ): Promise<Daemon> {
    const hv = this.host(host);
    const vmmd = await startDaemon(
      "vmm",
      [
        ...["--redis", this.redisUrl, "--host-id", hv.id, ...this.redisAuth(hostUser(hv.id))],
        ...["--ipam", this.ipamDaemon.address, "--netagent", hv.daemon.address, "--firewall", o.fwd.address, "--gateway", o.gwd.address],
        ...(o.args ?? []),
      ],
      o.env,
      undefined,
      o.daemon,
    );
    trackChild(vmmd.proc);
    return vmmd;
  }

  /**
   * Starts a firewall daemon for a hypervisor, as hostServices does (its
   * Redis, host id and Redis user; --drift-interval-ms driftMs if given; then
   * `args`), without the other daemons. Tracked: ended with the run.
   */
  async firewall(host: Hypervisor | number, o: { driftMs?: number; args?: string[] } = {}): Promise<Daemon> {
    const hv = this.host(host);
    const fwd = await startDaemon("firewall", [
      "--redis",
      this.redisUrl,
      "--host-id",
      hv.id,
      ...this.redisAuth(hostUser(hv.id)),
      ...driftArgs(o.driftMs),
      ...(o.args ?? []),
    ]);
    trackChild(fwd.proc);
    return fwd;
  }

  /**
   * A hypervisor's gateway flags as hostServices starts it: its Redis, host
   * id and namespace, uplink ul0, the floating pool, the metadata server's
   * way to Redis from that namespace (redisFrom) and the management CIDRs.
   */
  async gatewayFlags(host: Hypervisor | number): Promise<string[]> {
    const hv = this.host(host);
    return [
      "--redis",
      this.redisUrl,
      "--host-id",
      hv.id,
      ...this.redisAuth(hostUser(hv.id)),
      "--host-netns",
      hv.ns,
      "--uplink",
      "ul0",
      "--public-pool",
      FLOATING_POOL,
      "--imds-redis",
      await this.redisFrom(hv.ns),
      "--management-cidrs",
      MANAGEMENT_CIDRS,
    ];
  }

  /** redisFrom's answers by namespace and Redis URL (a cluster's forwarders start once per namespace). */
  private readonly forwards = new Map<string, Promise<string>>();

  /** The Redis URL for a process inside namespace `ns` of the run (a gateway's metadata server): redisUrlIn, once per namespace. */
  redisFrom(ns: string): Promise<string> {
    const key = `${ns} ${this.redisUrl}`;
    let url = this.forwards.get(key);
    if (!url) this.forwards.set(key, (url = redisUrlIn(ns, { server: this.redis, cluster: this.redisCluster })));
    return url;
  }

  /**
   * Moves a run on one redis-server to a Redis Cluster, as an operator
   * would: stops the agents and the ipam daemon (the caller stops the
   * daemons it started itself first), runs `move` (the copy, from the
   * redis-server's URL to the cluster's), then starts ipam and the agents
   * again on the cluster. From then on redisUrl, hostServices and
   * redisFrom give the cluster; the redis-server keeps running (this.redis)
   * for the test to compare with.
   */
  async moveToCluster(move: (from: string, to: string) => Promise<void>, cluster?: TestRedisCluster): Promise<void> {
    if (this.redisCluster) throw new Error("moveToCluster: the run is on a cluster already");
    if (this.acl) throw new Error("moveToCluster: not with redisAcl");
    await Promise.all(this.hosts.map((hv) => hv.stop()));
    await this.ipamDaemon.stop();
    const c = cluster ?? (await startRedisCluster());
    trackRedisNodes(c.nodes);
    await move(this.redis.url, c.url);
    this.redisCluster = c;
    this.ipamDaemon = await startDaemon("ipam", ["--redis", this.redisUrl, ...(this.opts.ipamArgs ?? [])]);
    trackChild(this.ipamDaemon.proc);
    this.ipam = ipamClients(this.ipamDaemon.address);
    for (const hv of this.hosts) hv.useRedis(this.redisUrl);
    await Promise.all(this.hosts.map((hv) => hv.start()));
  }

  /** Links of a VPC's namespace on a hypervisor. */
  async vpcLinks(host: Hypervisor | number, vpcId: string): Promise<LinkInfo[]> {
    return links(this.host(host).vpcNamespace(vpcId));
  }

  /** What changed in the root namespace since the harness started (should be nothing). */
  async rootChanges(): Promise<string[]> {
    return diffRoot(this.rootBefore, await rootSnapshot());
  }

  /**
   * Stops the agents (gracefully, then by PID), ipam and Redis, and deletes
   * every namespace of the run (the harness's and the agents'). Returns the
   * namespaces of the run still present afterwards (none, unless something
   * went wrong).
   */
  async close(): Promise<string[]> {
    if (this.closed) return [];
    this.closed = true;
    await Promise.all(this.hosts.map((hv) => hv.stop().catch(() => undefined)));
    await this.ipamDaemon?.stop().catch(() => undefined);
    await this.redis?.stop().catch(() => undefined);
    await this.redisCluster?.stop().catch(() => undefined);
    cleanupSync();
    return (await listNetns()).filter((n) => ownedNamespace(n));
  }
}
