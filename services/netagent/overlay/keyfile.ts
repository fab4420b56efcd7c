// This host's WireGuard identity: DIR/wg.key (mode 0600), made with
// `wg genkey` on first start and replaced whole on rotation (written to a
// temporary file, then renamed over the old one); its creation time is kept
// in DIR/wg.meta. Only the public key leaves this module: no message, log
// or error quotes the private key.
import { chmodSync, existsSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { WgKernel } from "./wgkernel.js";

/** A base64 Curve25519 key: 44 characters, the last before "=" one of those a 32-byte value can end in. */
export const WG_KEY_RE = /^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$/;

export interface HostKey {
  publicKey: string;
  createdMs: number;
}

export function keyFileIn(dir: string): string {
  return join(dir, "wg.key");
}

/** The key in DIR, or a new one if there is none. */
export async function loadOrCreateKey(dir: string, wgk: WgKernel): Promise<HostKey> {
  const file = keyFileIn(dir);
  if (!existsSync(file)) return newKey(dir, wgk);
  chmodSync(file, 0o600);
  let createdMs = Date.now();
  const publicKey = await pubkeyOf(file, readFileSync(file, "utf8"), wgk);
  try {
    const m = JSON.parse(readFileSync(join(dir, "wg.meta"), "utf8")) as { keyCreatedMs?: number };
    if (m.keyCreatedMs) createdMs = m.keyCreatedMs;
  } catch {
    // no metadata: keep now
  }
  return { publicKey, createdMs };
}

/** Makes a new key pair and puts it in place of the old one. */
export async function newKey(dir: string, wgk: WgKernel): Promise<HostKey> {
  const file = keyFileIn(dir);
  const priv = await wgk.genkey();
  if (priv === null) throw new Error("wg genkey failed");
  const publicKey = await pubkeyOf(file, priv, wgk);
  const tmp = `${file}.tmp`;
  writeFileSync(tmp, priv + "\n", { mode: 0o600 });
  chmodSync(tmp, 0o600);
  renameSync(tmp, file);
  const createdMs = Date.now();
  writeFileSync(join(dir, "wg.meta"), JSON.stringify({ keyCreatedMs: createdMs }), { mode: 0o600 });
  return { publicKey, createdMs };
}

async function pubkeyOf(file: string, priv: string, wgk: WgKernel): Promise<string> {
  const pub = await wgk.pubkey(priv);
  if (pub === null) throw new Error(`${file}: wg pubkey failed (not a WireGuard private key?)`);
  if (!WG_KEY_RE.test(pub)) throw new Error(`${file}: not a WireGuard private key`);
  return pub;
}
