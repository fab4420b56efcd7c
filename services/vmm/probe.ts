// What TestConnectivity probes, from its request: checked before anything
// resolves or runs, by the vmm and by the CLI (`microvpc test-connectivity`)
// alike.
import { InvalidArgumentError } from "../common/errors.js";
import * as V from "../common/validate.js";
import { Protocol } from "../../gen/microvpc/v1/firewall_pb.js";

export type ProbeProto = "icmp" | "tcp" | "udp";

/** The protocols a probe can be; ALL (and any other value) is none. */
const PROBE_PROTOS: Partial<Record<Protocol, ProbeProto>> = { [Protocol.ICMP]: "icmp", [Protocol.TCP]: "tcp", [Protocol.UDP]: "udp" };

/**
 * The probe of a TestConnectivity request: the protocol (unset: TCP with a
 * port, else ICMP; ALL is no probe), a port for TCP and UDP and none for
 * ICMP, and the wait, 100–30000 ms (default 2000), as the API says.
 */
export function probeOf(req: { protocol: Protocol; port?: number; timeoutMs?: number }): { proto: ProbeProto; port: number; timeoutMs: number } {
  const timeoutMs = req.timeoutMs ?? 2000;
  if (!Number.isInteger(timeoutMs) || timeoutMs < 100 || timeoutMs > 30_000)
    throw new InvalidArgumentError("timeout_ms", `${timeoutMs}: give 100–30000 ms, or leave it unset for 2000`);
  const proto = req.protocol === Protocol.UNSPECIFIED ? (req.port === undefined ? "icmp" : "tcp") : PROBE_PROTOS[req.protocol];
  if (!proto) throw new InvalidArgumentError("protocol", "a probe is ICMP, TCP or UDP (not ALL); leave it unset for TCP with a port, else ICMP");
  if (proto === "icmp") {
    if (req.port !== undefined) throw new InvalidArgumentError("port", "applies to TCP and UDP; an ICMP probe has no port");
    return { proto, port: 0, timeoutMs };
  }
  if (req.port === undefined) throw new InvalidArgumentError("port", `is required for a ${proto.toUpperCase()} probe (1–65535)`);
  return { proto, port: V.port("port", req.port), timeoutMs };
}
