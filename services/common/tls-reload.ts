// Server certificates that change on disk reach new connections without a
// restart. cert-manager renews a certificate in place (deploy/k8s's TLS
// component) and a Secret volume swaps its files; a daemon that read them
// once at start would serve the old certificate until it expired. Each
// daemon re-reads --tls-cert, --tls-key and --tls-client-ca every
// --tls-reload-interval-ms and serves what it read only once the three form
// a valid set (the key matches the certificate, every PEM parses): a
// half-written renewal, or a wrong file, is logged and counted, and the last
// good set is kept. grpc-js's CertificateProvider interface carries the
// update to its listeners; its own FileWatcherCertificateProvider would hand
// grpc-js whatever it read, a mismatched pair included.
import { X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { createSecureContext } from "node:tls";
import type { experimental } from "@grpc/grpc-js";
import type { Logger } from "pino";
import { Counter, Gauge } from "prom-client";
import { metricsRegistry } from "./metrics.js";

export const tlsCertificateExpiry = new Gauge({
  name: "microvpc_tls_certificate_expiry_timestamp_seconds",
  help: "Unix time at which the gRPC server certificate being served expires (absent without --tls-cert).",
  registers: [metricsRegistry],
});

export const tlsReloadErrors = new Counter({
  name: "microvpc_tls_reload_errors_total",
  help: "Re-reads of --tls-cert/--tls-key/--tls-client-ca that were refused (unreadable, unparsable, key not matching): the last good certificate is still served.",
  registers: [metricsRegistry],
});

export interface TlsFiles {
  cert: string;
  key: string;
  /** Mutual TLS: the CA client certificates must be signed by. */
  ca?: string;
}

interface Loaded {
  cert: Buffer;
  key: Buffer;
  ca: Buffer | null;
}

/** The three files as a set a TLS server can use; throws, saying which file is wrong and why, otherwise. */
export function checkTlsSet(files: TlsFiles, got: Loaded): X509Certificate {
  let leaf: X509Certificate;
  try {
    leaf = new X509Certificate(got.cert);
  } catch (e) {
    throw new Error(`${files.cert}: not a PEM certificate (${(e as Error).message})`, { cause: e });
  }
  if (got.ca) {
    try {
      new X509Certificate(got.ca);
    } catch (e) {
      throw new Error(`${files.ca}: not a PEM certificate (${(e as Error).message})`, { cause: e });
    }
  }
  try {
    // OpenSSL checks that the key is the certificate's.
    createSecureContext({ cert: got.cert, key: got.key, ...(got.ca ? { ca: got.ca } : {}) });
  } catch (e) {
    throw new Error(`${files.key} does not fit ${files.cert}: ${(e as Error).message}`, { cause: e });
  }
  return leaf;
}

const same = (a: Buffer | null, b: Buffer | null) => (a === null ? b === null : b !== null && a.equals(b));

/**
 * A grpc-js CertificateProvider over the daemon's TLS files. The first read
 * happens in the constructor and throws, so a daemon with bad files does not
 * start; later reads that fail keep the last good set.
 */
export class ReloadingTlsFiles implements experimental.CertificateProvider {
  private current: Loaded;
  private readonly identityListeners = new Set<experimental.IdentityCertificateUpdateListener>();
  private readonly caListeners = new Set<experimental.CaCertificateUpdateListener>();
  private timer?: NodeJS.Timeout;
  private reading = false;
  /** The reason last logged for a refused set: said once, not every interval. */
  private refused = "";

  constructor(
    readonly files: TlsFiles,
    readonly intervalMs: number,
    private readonly log?: Logger,
  ) {
    this.current = { cert: readFileSync(files.cert), key: readFileSync(files.key), ca: files.ca ? readFileSync(files.ca) : null };
    this.served(checkTlsSet(files, this.current));
    if (intervalMs > 0) {
      this.timer = setInterval(() => void this.reload(), intervalMs);
      this.timer.unref();
    }
  }

  /** Reads the files again; serves them if they changed and form a valid set. Resolves to whether it switched. */
  async reload(): Promise<boolean> {
    if (this.reading) return false;
    this.reading = true;
    try {
      let next: Loaded;
      let leaf: X509Certificate;
      try {
        const [cert, key, ca] = await Promise.all([
          readFile(this.files.cert),
          readFile(this.files.key),
          this.files.ca ? readFile(this.files.ca) : Promise.resolve(null),
        ]);
        next = { cert, key, ca };
        if (same(next.cert, this.current.cert) && same(next.key, this.current.key) && same(next.ca, this.current.ca)) {
          this.refused = "";
          return false;
        }
        leaf = checkTlsSet(this.files, next);
      } catch (e) {
        const reason = (e as Error).message;
        tlsReloadErrors.inc();
        if (reason !== this.refused) this.log?.warn({ err: reason }, "TLS files changed but cannot be served; keeping the last good certificate");
        this.refused = reason;
        return false;
      }
      this.refused = "";
      this.current = next;
      this.served(leaf);
      for (const l of this.identityListeners) l({ certificate: next.cert, privateKey: next.key });
      for (const l of this.caListeners) l(next.ca ? { caCertificate: next.ca } : null);
      return true;
    } finally {
      this.reading = false;
    }
  }

  private served(leaf: X509Certificate): void {
    const expires = Date.parse(leaf.validTo);
    tlsCertificateExpiry.set(expires / 1000);
    this.log?.info(
      { subject: leaf.subject.replace(/\n/g, ", "), serial: leaf.serialNumber, notAfter: new Date(expires).toISOString(), fingerprint: leaf.fingerprint256 },
      "serving TLS certificate",
    );
  }

  close(): void {
    clearInterval(this.timer);
  }

  addIdentityCertificateListener(l: experimental.IdentityCertificateUpdateListener): void {
    this.identityListeners.add(l);
    const c = this.current;
    process.nextTick(l, { certificate: c.cert, privateKey: c.key });
  }

  removeIdentityCertificateListener(l: experimental.IdentityCertificateUpdateListener): void {
    this.identityListeners.delete(l);
  }

  addCaCertificateListener(l: experimental.CaCertificateUpdateListener): void {
    this.caListeners.add(l);
    const c = this.current;
    process.nextTick(l, c.ca ? { caCertificate: c.ca } : null);
  }

  removeCaCertificateListener(l: experimental.CaCertificateUpdateListener): void {
    this.caListeners.delete(l);
  }
}
