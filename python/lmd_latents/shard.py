"""One latent shard (``.lmds``, format version 1; ``docs/FORMAT.md`` is the specification).

A :class:`Shard` maps the file and parses its header, footer and index once; blocks are
decompressed on demand (:meth:`Shard.block`), each checked against its XXH3-64 checksum first.
Every error names the file and, where there is one, the block and its byte offset.
"""
import json
import mmap
import os
import struct

import numpy as np
import xxhash
import zstandard

MAGIC = b"LMDSHARD"
BLOCK_MAGIC = b"LMDBLOCK"
END_MAGIC = b"LMDS_END"
VERSION = 1
FOOTER = 48
BLOCK_HEADER = 32
DTYPES = {"f16": np.dtype("<f2"), "bf16": np.dtype("<u2"), "f32": np.dtype("<f4")}


class ShardError(Exception):
    """A shard or dataset that cannot be read as it claims: names the file (and block/offset)."""


_DCTX = zstandard.ZstdDecompressor()


def _frame_len(mv):
    """Compressed length of the zstd frame at the start of ``mv`` (walks its block headers)."""
    pos = zstandard.frame_header_size(mv)
    checksum = (mv[4] >> 2) & 1
    while True:
        bh = mv[pos] | (mv[pos + 1] << 8) | (mv[pos + 2] << 16)
        last, typ, size = bh & 1, (bh >> 1) & 3, bh >> 3
        pos += 3 + (1 if typ == 1 else size)
        if pos > len(mv):
            raise zstandard.ZstdError("frame runs past the payload")
        if last:
            return pos + 4 * checksum


def _frames(data):
    """Decompress concatenated zstd frames (one per byte plane): a list of bytes."""
    mv = memoryview(data)
    out = []
    while len(mv):
        n = _frame_len(mv)
        if zstandard.frame_content_size(mv) >= 0:
            out.append(_DCTX.decompress(mv[:n]))
        else:
            out.append(_DCTX.decompressobj().decompress(mv[:n]))
        mv = mv[n:]
    return out


def to_float32(raw, dtype):
    """Stored elements of ``dtype`` (f16, bf16, f32; an array or little-endian bytes) as a
    float32 array."""
    a = raw if isinstance(raw, np.ndarray) else np.frombuffer(raw, dtype=DTYPES[dtype])
    if dtype == "bf16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


class Shard:
    """A latent shard file, opened and checked (magic, version, checksums, index)."""

    def __init__(self, path, verify=True):
        self.path = os.fspath(path)
        self.verify = verify
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24 + FOOTER:
                raise ShardError(f"{self.path}: {size} bytes: too short to be a complete shard")
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        b = self._buf
        if b[:8] != MAGIC:
            raise ShardError(f"{self.path}: not an lmd latent shard (magic {bytes(b[:8])!r})")
        version, meta_len = struct.unpack_from("<II", b, 8)
        if version != VERSION:
            raise ShardError(f"{self.path}: format version {version}, this reader knows {VERSION}")
        (meta_sum,) = struct.unpack_from("<Q", b, 16)
        meta_bytes = b[24 : 24 + meta_len]
        if verify and xxhash.xxh3_64_intdigest(meta_bytes) != meta_sum:
            raise ShardError(f"{self.path}: metadata checksum mismatch at byte 24")
        self.meta = json.loads(meta_bytes)
        self.data_start = 24 + meta_len
        if b[size - 8 :] != END_MAGIC:
            raise ShardError(f"{self.path}: no footer (an incomplete or truncated shard)")
        foot = b[size - FOOTER : size - 8]
        index_off, index_len, index_sum, n_records, footer_sum = struct.unpack("<QQQQQ", foot)
        if verify and xxhash.xxh3_64_intdigest(foot[:32]) != footer_sum:
            raise ShardError(f"{self.path}: footer checksum mismatch at byte {size - FOOTER}")
        if index_off + index_len != size - FOOTER:
            raise ShardError(f"{self.path}: index at {index_off}+{index_len} does not end at the footer")
        idx_comp = b[index_off : index_off + index_len]
        if verify and xxhash.xxh3_64_intdigest(idx_comp) != index_sum:
            raise ShardError(f"{self.path}: index checksum mismatch at byte {index_off}")
        idx = b"".join(_frames(idx_comp))
        n_blocks, flags = struct.unpack_from("<II", idx, 0)
        pos = 8
        blocks = np.frombuffer(idx, dtype=np.dtype([("off", "<u8"), ("len", "<u4"), ("n", "<u4"), ("sum", "<u8")]),
                               count=n_blocks, offset=pos)
        pos += 24 * n_blocks
        self.blocks = blocks.copy()
        self.labels = None
        if flags & 1:
            self.labels = np.frombuffer(idx, dtype="<i8", count=n_records, offset=pos).copy()
            pos += 8 * n_records
        ends = np.frombuffer(idx, dtype="<u4", count=n_records, offset=pos).astype(np.int64)
        pos += 4 * n_records
        blob = idx[pos:]
        starts = np.concatenate([[0], ends[:-1]]) if n_records else ends
        self.keys = [blob[s:e].decode("utf-8") for s, e in zip(starts, ends)]
        self.n_records = int(n_records)
        counts = self.blocks["n"].astype(np.int64)
        if int(counts.sum()) != self.n_records:
            raise ShardError(f"{self.path}: blocks hold {int(counts.sum())} records, the footer says {n_records}")
        self.block_first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        c, h, w = self.meta["latent_shape"]
        lay = self.meta["layout"]
        self.fields = list(lay["fields"])
        self.views = int(lay["views"])
        self.flip = bool(lay["flip"])
        self.tensors = self.views * (2 if self.flip else 1) * len(self.fields)
        self.shape = (c, h, w)
        self.dtype = self.meta["dtype"]
        self.esize = DTYPES[self.dtype].itemsize
        self.record_elems = self.tensors * c * h * w

    def __len__(self):
        return self.n_records

    def close(self):
        self._buf.close()

    def block_of(self, i):
        """The block holding record ``i``."""
        return int(np.searchsorted(self.block_first, i, side="right") - 1)

    def block_raw(self, k):
        """Block ``k`` decompressed: its elements in order, as a flat array of the stored type."""
        off, comp_len, n, csum = (int(x) for x in self.blocks[k])
        b = self._buf
        if b[off : off + 8] != BLOCK_MAGIC:
            raise ShardError(f"{self.path}: block {k} at byte {off}: bad block header")
        payload = memoryview(b)[off + BLOCK_HEADER : off + BLOCK_HEADER + comp_len]
        if self.verify and xxhash.xxh3_64_intdigest(payload) != csum:
            raise ShardError(f"{self.path}: block {k} at byte {off}: checksum mismatch")
        try:
            frames = _frames(payload)
        except (zstandard.ZstdError, IndexError) as e:
            raise ShardError(f"{self.path}: block {k} at byte {off}: {e}") from None
        want = n * self.record_elems * self.esize
        got = sum(len(f) for f in frames)
        if got != want:
            raise ShardError(f"{self.path}: block {k} at byte {off}: {got} bytes, expected {want}")
        if self.meta.get("byte_shuffle", False) and len(frames) == self.esize:
            if self.esize == 2:
                # two planes (low bytes, high bytes) -> little-endian u16
                x = np.frombuffer(frames[1], dtype=np.uint8).astype(np.uint16)
                x <<= 8
                x |= np.frombuffer(frames[0], dtype=np.uint8)
                return x.view(DTYPES[self.dtype])
            out = np.empty((got // self.esize, self.esize), dtype=np.uint8)
            for j, f in enumerate(frames):
                out[:, j] = np.frombuffer(f, dtype=np.uint8)
            return out.reshape(-1).view(DTYPES[self.dtype])
        if self.meta.get("byte_shuffle", False):
            planes = np.frombuffer(b"".join(frames), dtype=np.uint8).reshape(self.esize, -1)
            return np.ascontiguousarray(planes.T).reshape(-1).view(DTYPES[self.dtype])
        return np.frombuffer(b"".join(frames), dtype=DTYPES[self.dtype])

    def block_stored(self, k):
        """Block ``k`` in its stored element type ``[n, tensors, C, H, W]`` (float16, float32,
        or uint16 holding bf16 bits): checked and decompressed, not converted."""
        n = int(self.blocks[k]["n"])
        return self.block_raw(k).reshape((n, self.tensors) + self.shape)

    def block(self, k):
        """Block ``k`` as float32 ``[n, tensors, C, H, W]`` (scaling not applied)."""
        n = int(self.blocks[k]["n"])
        return to_float32(self.block_raw(k), self.dtype).reshape((n, self.tensors) + self.shape)

    def read(self):
        """Every record: float32 ``[N, tensors, C, H, W]``."""
        if not self.n_records:
            return np.zeros((0, self.tensors) + self.shape, dtype=np.float32)
        return np.concatenate([self.block(k) for k in range(len(self.blocks))])


def read(path, verify=True):
    """A whole shard: ``latents`` float32 ``[N, tensors, C, H, W]``, ``labels`` (int64 or None),
    ``keys`` (list of str), ``meta`` (the header JSON)."""
    s = Shard(path, verify=verify)
    try:
        return {"latents": s.read(), "labels": s.labels, "keys": s.keys, "meta": s.meta}
    finally:
        s.close()
