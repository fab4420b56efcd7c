// The conntrack flush by mark (common/conntrack.ts): the netlink request
// built by hand, since libnetfilter_conntrack 1.0.9 cannot send it, and the
// reading of the kernel's answer. The kernel side is the netagent
// integration test (a detach clears exactly its NIC's flows) and
// bench:conntrack.
import assert from "node:assert/strict";
import { describe, test } from "vitest";
import { ackError, kernelFlushesByMark, markFlushMessage } from "../../services/common/conntrack.js";
import { markFilters } from "../../services/netagent/ct-marks.js";

describe("markFlushMessage", () => {
  test("a ctnetlink DELETE without a tuple, with CTA_MARK and CTA_MARK_MASK in network order", () => {
    const [high] = markFilters(7);
    const b = markFlushMessage(high, 42);
    assert.equal(b.length, 36);
    assert.equal(b.readUInt32LE(0), 36, "nlmsg_len: the whole message");
    assert.equal(b.readUInt16LE(4), (1 << 8) | 2, "NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_DELETE");
    assert.equal(b.readUInt16LE(6), 1 | 4, "NLM_F_REQUEST | NLM_F_ACK: the kernel answers, with an error or 0");
    assert.equal(b.readUInt32LE(8), 42, "the sequence number");
    assert.deepEqual([b[16], b[17], b.readUInt16BE(18)], [2, 0, 0], "nfgenmsg: AF_INET, version 0 (no family filter), res_id 0");
    assert.deepEqual([b.readUInt16LE(20), b.readUInt16LE(22), b.readUInt32BE(24)], [8, 8, 7 << 16], "CTA_MARK: the value");
    assert.deepEqual([b.readUInt16LE(28), b.readUInt16LE(30), b.readUInt32BE(32)], [8, 21, 0xffff0000], "CTA_MARK_MASK: the mask");
    // No CTA_TUPLE_ORIG (type 1) nor CTA_TUPLE_REPLY (2): with one the kernel would delete that one entry, not flush.
    for (let off = 20; off < b.length; off += b.readUInt16LE(off)) assert.ok(![1, 2].includes(b.readUInt16LE(off + 2)));
  });

  test("the low half's filter, and a mask with the top bit set, stay unsigned", () => {
    const [, low] = markFilters(0xffff);
    const b = markFlushMessage(low, 0xffffffff);
    assert.equal(b.readUInt32BE(24), 0xffff);
    assert.equal(b.readUInt32BE(32), 0xffff);
    assert.equal(b.readUInt32LE(8), 0xffffffff);
    assert.equal(markFlushMessage({ value: 0x80000000, mask: 0xffffffff }, 1).readUInt32BE(24), 0x80000000);
  });
});

describe("ackError", () => {
  const answer = (type: number, error: number, len = 36) => {
    const b = Buffer.alloc(len);
    b.writeUInt32LE(len, 0);
    b.writeUInt16LE(type, 4);
    if (len >= 20) b.writeInt32LE(error, 16);
    return b;
  };
  test("NLMSG_ERROR with 0 is done; with -errno, the kernel's refusal", () => {
    assert.equal(ackError(answer(2, 0), 36), 0);
    assert.equal(ackError(answer(2, -95), 36), -95, "EOPNOTSUPP: the caller dumps instead");
    assert.equal(ackError(answer(2, -1), 36), -1);
  });
  test("anything else is not an answer", () => {
    assert.equal(ackError(answer(3, 0), 36), null, "NLMSG_DONE");
    assert.equal(ackError(answer(0x102, 0), 36), null, "a conntrack message");
    assert.equal(ackError(answer(2, 0), 12), null, "too short to hold the error");
    assert.equal(ackError(Buffer.alloc(64), -1), null, "recv failed");
  });
});

describe("kernelFlushesByMark", () => {
  test("5.0 and later flush by mark; an older kernel, or a release that does not parse, gets the dumps (an old kernel would flush the whole table)", () => {
    for (const r of ["6.18.44-fc-v1272", "6.1.0-27-amd64", "5.0.0", "5.10.0-33-cloud-amd64"]) assert.equal(kernelFlushesByMark(r), true, r);
    for (const r of ["4.19.0-27-amd64", "4.9.0", "3.10.0-1160.el7.x86_64", "", "linux"]) assert.equal(kernelFlushesByMark(r), false, r);
  });
});
