#!/usr/bin/env python3
"""Read lmd latent shards (.lmds, format version 1) in pure Python: numpy + zstandard.

    import lmd_shard
    d = lmd_shard.read("shard-000000.lmds")
    d["latents"]   # np.ndarray [N, tensors_per_record, C, H, W] (f16 -> float16, bf16/f32 -> float32)
    d["labels"]    # np.ndarray int64 [N] or None
    d["keys"]      # list of str
    d["meta"]      # dict, the shard's JSON metadata

CLI: ``python3 tools/lmd_shard.py SHARD [--verify]`` prints a JSON summary.
The byte layout is specified in docs/FORMAT.md; this file is its reference reader.
"""
import json
import struct
import sys

import numpy as np
import zstandard

MAGIC = b"LMDSHARD"
BLOCK_MAGIC = b"LMDBLOCK"
END_MAGIC = b"LMDS_END"
VERSION = 1
FOOTER = 48
BLOCK_HEADER = 32


class ShardError(Exception):
    pass


def _xxh3(data):
    try:
        import xxhash  # optional: checksums are verified only when available
    except ImportError:
        return None
    return xxhash.xxh3_64_intdigest(data)


def _zstd_all_frames(data):
    """Decompress concatenated zstd frames (a block with byte planes holds one frame per plane)."""
    out = []
    while data:
        dobj = zstandard.ZstdDecompressor().decompressobj()
        out.append(dobj.decompress(data))
        data = dobj.unused_data
    return b"".join(out)


def read(path):
    with open(path, "rb") as f:
        b = f.read()
    if b[:8] != MAGIC:
        raise ShardError(f"{path}: not an lmd latent shard")
    version, meta_len = struct.unpack_from("<II", b, 8)
    if version != VERSION:
        raise ShardError(f"{path}: unsupported version {version}")
    meta = json.loads(b[24 : 24 + meta_len])
    if len(b) < 24 + meta_len + FOOTER or b[-8:] != END_MAGIC:
        raise ShardError(f"{path}: truncated (no footer)")
    index_off, index_len, index_sum, n_records, _footer_sum = struct.unpack_from("<QQQQQ", b, len(b) - FOOTER)
    idx_comp = b[index_off : index_off + index_len]
    s = _xxh3(idx_comp)
    if s is not None and s != index_sum:
        raise ShardError(f"{path}: index checksum mismatch")
    idx = _zstd_all_frames(idx_comp)
    n_blocks, flags = struct.unpack_from("<II", idx, 0)
    pos = 8
    blocks = []
    for _ in range(n_blocks):
        blocks.append(struct.unpack_from("<QIIQ", idx, pos))
        pos += 24
    labels = None
    if flags & 1:
        labels = np.frombuffer(idx, dtype="<i8", count=n_records, offset=pos).copy()
        pos += 8 * n_records
    ends = np.frombuffer(idx, dtype="<u4", count=n_records, offset=pos)
    pos += 4 * n_records
    key_blob = idx[pos:]
    keys, start = [], 0
    for e in ends:
        keys.append(key_blob[start:e].decode("utf-8"))
        start = int(e)

    dtype = {"f16": "<f2", "bf16": "<u2", "f32": "<f4"}[meta["dtype"]]
    esize = np.dtype(dtype).itemsize
    c, h, w = meta["latent_shape"]
    lay = meta["layout"]
    tensors = lay["views"] * (2 if lay["flip"] else 1) * len(lay["fields"])
    rec_elems = tensors * c * h * w
    parts = []
    for k, (off, comp_len, n, csum) in enumerate(blocks):
        head = b[off : off + BLOCK_HEADER]
        if head[:8] != BLOCK_MAGIC:
            raise ShardError(f"{path}: block {k}: bad frame header")
        payload = b[off + BLOCK_HEADER : off + BLOCK_HEADER + comp_len]
        s = _xxh3(payload)
        if s is not None and s != csum:
            raise ShardError(f"{path}: block {k}: checksum mismatch")
        raw = _zstd_all_frames(payload)
        if len(raw) != n * rec_elems * esize:
            raise ShardError(f"{path}: block {k}: {len(raw)} bytes, expected {n * rec_elems * esize}")
        if meta["byte_shuffle"]:
            planes = np.frombuffer(raw, dtype=np.uint8).reshape(esize, -1)
            raw = planes.T.copy().tobytes()
        parts.append(np.frombuffer(raw, dtype=dtype))
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
    if meta["dtype"] == "bf16":
        flat = (flat.astype(np.uint32) << 16).view(np.float32)
    latents = flat.reshape(n_records, tensors, c, h, w)
    return {"latents": latents, "labels": labels, "keys": keys, "meta": meta}


def main(argv):
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0 if len(argv) >= 2 else 2
    d = read(argv[1])
    lat = d["latents"]
    summary = {
        "path": argv[1],
        "records": int(lat.shape[0]),
        "latent_shape": d["meta"]["latent_shape"],
        "tensors_per_record": int(lat.shape[1]) if lat.ndim > 1 else 0,
        "dtype": d["meta"]["dtype"],
        "vae": d["meta"]["vae"],
        "labels": None if d["labels"] is None else sorted(set(int(x) for x in d["labels"])),
        "first_keys": d["keys"][:3],
        "mean": float(lat.astype(np.float64).mean()) if lat.size else None,
        "std": float(lat.astype(np.float64).std()) if lat.size else None,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
