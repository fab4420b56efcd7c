// microvpcd vmm: the metald-style VM manager of one hypervisor. It calls the
// other services over gRPC, as an orchestrator would.
import { readFileSync } from "node:fs";
import { Option } from "commander";
import { readToken, type ServiceDefinition } from "../common/daemon.js";
import { grpcClient, grpcTransport, tokenRefusal } from "../common/client.js";
import { hostIdOption } from "../common/host.js";
import { waitReady } from "../common/redis.js";
import { DnsService } from "../../gen/microvpc/v1/dns_pb.js";
import { FirewallService } from "../../gen/microvpc/v1/firewall_pb.js";
import { GatewayService } from "../../gen/microvpc/v1/gateway_pb.js";
import { IpamService } from "../../gen/microvpc/v1/ipam_pb.js";
import { NetAgentService } from "../../gen/microvpc/v1/netagent_pb.js";
import { SubnetService } from "../../gen/microvpc/v1/subnet_pb.js";
import { VpcService } from "../../gen/microvpc/v1/vpc_pb.js";
import { vmmRoutes } from "./routes.js";
import { Vmm, type Booter } from "./service.js";
import { VmStore } from "./store.js";
import { netnsStartInfo } from "./netns.js";

export const vmmDefinition: ServiceDefinition = {
  name: "vmm",
  summary: "metald-style VM manager: CreateVm/DeleteVm over ipam → netagent → firewall → gateway → dns → boot, undone on failure",
  defaultPort: 7405,
  startInfo: netnsStartInfo,
  options: [
    hostIdOption(),
    new Option("--ipam <addr>", "ipam gRPC address").env("MICROVPC_IPAM_ADDR").default("127.0.0.1:7401"),
    new Option("--netagent <addr>", "netagent gRPC address").env("MICROVPC_NETAGENT_ADDR").default("127.0.0.1:7402"),
    new Option("--firewall <addr>", "firewall gRPC address").env("MICROVPC_FIREWALL_ADDR").default("127.0.0.1:7403"),
    new Option("--gateway <addr>", "gateway gRPC address").env("MICROVPC_GATEWAY_ADDR").default("127.0.0.1:7404"),
    new Option("--service-token <token>", "bearer token for calls to the other services").env("MICROVPC_SERVICE_TOKEN"),
    new Option("--service-token-file <path>", "read that bearer token from a file (preferred: in no variable or argv)").env("MICROVPC_SERVICE_TOKEN_FILE"),
    new Option("--ca-file <path>", "CA (PEM) that signed the other services' certificates, for their https:// addresses (default: the system's CAs)").env(
      "MICROVPC_CA_FILE",
    ),
    new Option("--client-cert <path>", "client certificate (PEM) presented to https:// services that require mutual TLS (--tls-client-ca)").env(
      "MICROVPC_CLIENT_CERT",
    ),
    new Option("--client-key <path>", "private key (PEM) of --client-cert").env("MICROVPC_CLIENT_KEY"),
    new Option(
      "--insecure-send-token",
      "send the service token over plaintext (http://) to non-loopback addresses too; by default only https:// or loopback addresses get it",
    ).env("MICROVPC_INSECURE_SEND_TOKEN"),
  ],
  async build({ flags, redis, logger }) {
    const token = readToken({ token: flags.serviceToken as string | undefined, tokenFile: flags.serviceTokenFile as string | undefined }, "--service-token");
    if (!!flags.clientCert !== !!flags.clientKey) throw new Error("--client-cert and --client-key go together");
    const tls = {
      ca: flags.caFile ? readFileSync(String(flags.caFile)) : undefined,
      cert: flags.clientCert ? readFileSync(String(flags.clientCert)) : undefined,
      key: flags.clientKey ? readFileSync(String(flags.clientKey)) : undefined,
    };
    const addresses = [flags.ipam, flags.netagent, flags.firewall, flags.gateway].map(String);
    // The token would cross the network in clear text: refused, as the CLI does.
    for (const a of addresses) {
      const refusal = tokenRefusal(a, token, !!flags.insecureSendToken);
      if (refusal) throw new Error(refusal);
    }
    if ((tls.ca || tls.cert) && !addresses.some((a) => a.startsWith("https://"))) {
      throw new Error("--ca-file/--client-cert are for https:// service addresses, and none is: write e.g. --ipam https://10.1.2.3:7401");
    }
    // TLS material goes to https:// addresses only; http:// ones (loopback) stay h2c.
    const t = (address: unknown) =>
      grpcTransport({ address: String(address), token, timeoutMs: 30_000, tls: String(address).startsWith("https://") ? tls : undefined });
    const ipamT = t(flags.ipam);
    const clients = {
      vpc: grpcClient(VpcService, ipamT),
      subnet: grpcClient(SubnetService, ipamT),
      ipam: grpcClient(IpamService, ipamT),
      netagent: grpcClient(NetAgentService, t(flags.netagent)),
      firewall: grpcClient(FirewallService, t(flags.firewall)),
      gateway: grpcClient(GatewayService, t(flags.gateway)),
      // DnsService is served by the ipam daemon.
      dns: grpcClient(DnsService, ipamT),
    };
    const booters: Partial<Record<"qemu" | "firecracker", Booter>> = {};
    try {
      const { qemuBooter } = await import("./booters.js");
      booters.qemu = qemuBooter(logger);
      // KVM or TCG for kind=qemu: decided in the background (up to a few
      // seconds: it boots the guest under KVM), logged once.
      const { startAccelProbe } = await import("./accel.js");
      startAccelProbe(logger);
    } catch {
      logger.info("kind=qemu not available in this build");
    }
    const vmm = new Vmm(new VmStore(redis, String(flags.hostId), logger), clients, { hostId: String(flags.hostId), booters }, logger);
    // Finish or undo what a previous run left in flight, before serving
    // (and keep trying in the background while Redis is unreachable).
    try {
      await waitReady(redis, 10_000);
      await vmm.recover();
    } catch (err) {
      logger.warn({ err: (err as Error).message }, "recovery postponed until Redis answers");
    }
    // Recovery that failed (or was postponed) is retried, each VM with backoff.
    const stopRetries = vmm.startRecoveryRetries();
    let closed = false;
    vmm.followInvalidations(redis, () => closed);
    return {
      services: vmmRoutes(vmm),
      close: async () => {
        closed = true;
        vmm.watchHub.close();
        stopRetries();
      },
    };
  },
};
