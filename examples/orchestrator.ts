// An orchestrator's use of the vmm, as docs/integration.md explains it:
// CreateVm with a client token, retried on the codes that mean "try again",
// and DeleteVm, which is idempotent. Typechecked by `npm test` (tsc), so the
// guide's code keeps compiling against the generated API.
//
//   node --import tsx examples/orchestrator.ts 127.0.0.1:7405 prod web web-1
import { randomUUID } from "node:crypto";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { VmKind, VmService, type Vm } from "../gen/microvpc/v1/vm_pb.js";

/** Codes after which the same request, with the same client_token, may be sent again. */
const RETRYABLE = new Set([Code.Unavailable, Code.DeadlineExceeded, Code.Aborted]);

export function vmmClient(address: string, token?: string) {
  const transport = createGrpcTransport({
    baseUrl: /^https?:\/\//.test(address) ? address : `http://${address}`,
    // Every call carries a request id: the vmm logs it and passes it (and
    // traceparent) to every daemon it calls for this VM.
    interceptors: [
      (next) => async (req) => {
        if (!req.header.has("x-request-id")) req.header.set("x-request-id", randomUUID());
        if (token) req.header.set("authorization", `Bearer ${token}`);
        return next(req);
      },
    ],
  });
  return createClient(VmService, transport);
}

/** Runs call until it succeeds or fails for good: at most `attempts` tries, backing off 0.2, 0.4, 0.8 … s. */
export async function withRetries<T>(call: () => Promise<T>, attempts = 5): Promise<T> {
  for (let i = 1; ; i++) {
    try {
      return await call();
    } catch (err) {
      const e = ConnectError.from(err);
      if (i >= attempts || !RETRYABLE.has(e.code)) throw e;
      await new Promise((r) => setTimeout(r, 200 * 2 ** (i - 1)));
    }
  }
}

/**
 * Creates the VM and returns it once its network is ready and enforced.
 * The token is the orchestrator's own id for this VM (store it before the
 * first call): every retry with it returns the same VM, never a second one.
 */
export async function createVm(address: string, vpc: string, subnet: string, name: string, clientToken: string): Promise<Vm> {
  const vmm = vmmClient(address, process.env.MICROVPC_TOKEN);
  const res = await withRetries(() =>
    vmm.createVm(
      { name, vpc, subnet, kind: VmKind.NETNS, securityGroups: ["web-sg"], clientToken },
      // CreateVm waits for every step (allocate, attach, bind, metadata,
      // DNS, boot); give it a deadline an order above its p99.
      { timeoutMs: 30_000 },
    ),
  );
  return res.vm!;
}

export async function deleteVm(address: string, vpc: string, name: string): Promise<boolean> {
  const vmm = vmmClient(address, process.env.MICROVPC_TOKEN);
  // Idempotent: a VM that is already gone is a success (deleted: false).
  const res = await withRetries(() => vmm.deleteVm({ ref: name, vpc }, { timeoutMs: 30_000 }));
  return res.deleted;
}

if (process.argv[1]?.endsWith("orchestrator.ts")) {
  const [address = "127.0.0.1:7405", vpc = "prod", subnet = "web", name = "web-1"] = process.argv.slice(2);
  const vm = await createVm(address, vpc, subnet, name, `orchestrator-${vpc}-${name}`);
  console.log(`${vm.name} ${vm.id} on ${vm.hostId}: ${vm.nics[0]?.guest?.address ?? "?"}`);
  console.log(`deleted: ${await deleteVm(address, vpc, name)}`);
}
