// The previous release's VM claim (services/vmm/store.ts at d09214e), kept
// verbatim: what a vmm of that release does on CreateVm, on another host
// still running it mid-upgrade (test/integration/vmm-layout.test.ts). Its
// keys were mvpc:vm:host:H…, mvpc-md:H:… and mvpc:vm:vpc:V:byname.
import type { Redis } from "ioredis";
import { storedVmText } from "../../services/vmm/schema.js";
import type { VmRec } from "../../services/vmm/store.js";

export const NAME_HELD_LUA = `
local taken = false
if held then
  local h, i = string.match(held, '^([a-z0-9]+)/(vm%-[0-9a-f]+)$')
  local legacy = false
  if not h then
    i = string.match(held, '^(vm%-[0-9a-f]+)$')
    h = ARGV[7]
    legacy = true
  end
  if i then
    local rec = redis.call('GET', 'mvpc:vm:host:' .. h .. ':vm:' .. i)
    if rec then
      local ok, o = pcall(cjson.decode, rec)
      if ok and type(o) == 'table' and o.id == i and o.hostId == h and o.name == ARGV[1] and o.vpcId == ARGV[6] then taken = true end
    end
    if legacy and not taken and redis.call('EXISTS', 'mvpc:vm:' .. i) == 1 then taken = true end
  end
end`;

/** The previous release's keys (its store's K). */
export const previousKeys = {
  host: (h: string) => `mvpc:vm:host:${h}`,
  vm: (h: string, id: string) => `mvpc:vm:host:${h}:vm:${id}`,
  lease: (h: string, id: string) => `mvpc:vm:host:${h}:lease:${id}`,
  byName: (vpc: string) => `mvpc:vm:vpc:${vpc}:byname`,
  hosts: "mvpc:vm:hosts",
  userData: (h: string, id: string) => `mvpc-md:${h}:vm:${id}:userdata`,
};

/** VmStore.claim of the previous release, run as host v.hostId: the name entry holding the name ("<host>/<id>": its own if it won). */
export async function previousClaim(redis: Redis, v: VmRec, leaseToken: string): Promise<string> {
  const K = previousKeys;
  const r = await redis.eval(
    `local held = redis.call('HGET', KEYS[1], ARGV[1])
       ${NAME_HELD_LUA}
       if taken then return held end
       redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
       redis.call('SET', KEYS[2], ARGV[3])
       redis.call('SET', KEYS[5], ARGV[4], 'PX', ARGV[5])
       redis.call('SADD', KEYS[3], ARGV[8])
       redis.call('SADD', KEYS[4], ARGV[7])
       if ARGV[9] ~= '' then redis.call('SET', KEYS[6], ARGV[9]) else redis.call('DEL', KEYS[6]) end
       redis.call('XADD', 'mvpc:events', 'MAXLEN', '~', 100000, '*', 'kind', 'vm.created', 'vm', ARGV[8])
       return ARGV[2]`,
    6,
    K.byName(v.vpcId),
    K.vm(v.hostId, v.id),
    K.host(v.hostId),
    K.hosts,
    K.lease(v.hostId, v.id),
    K.userData(v.hostId, v.id),
    v.name,
    `${v.hostId}/${v.id}`,
    storedVmText(v),
    leaseToken,
    15_000,
    v.vpcId,
    v.hostId,
    v.id,
    v.userData,
  );
  return String(r);
}
