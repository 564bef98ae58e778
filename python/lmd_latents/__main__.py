"""``python -m lmd_latents PATH [--verify] [--bench [--repeat N]]``: a JSON summary of a shard
or dataset directory; ``--verify`` hashes every shard against the manifest; ``--bench`` prints
one JSON line with the sequential read speed (all blocks decompressed, checked and converted to
float32), the figure ``lmd-bench python-reader`` compares with the Rust reader."""
import argparse
import json
import os
import sys
import time

import numpy as np

from .dataset import LatentDataset
from .shard import Shard, ShardError


def _timed(ds, repeat, read):
    best, total = None, 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        n = 0
        for sh in ds.shards:
            for k in range(len(sh.blocks)):
                n += read(sh, k).nbytes
        dt = time.perf_counter() - t0
        total = n
        best = dt if best is None else min(best, dt)
    return total, best


def bench(ds, repeat):
    """Sequential read of every block: stored elements (checked, decompressed, planes undone)
    and the same converted to float32."""
    stored, s_best = _timed(ds, repeat, lambda sh, k: sh.block_stored(k))
    f32, f_best = _timed(ds, repeat, lambda sh, k: sh.block(k))
    return {"bench": "python_sequential_read", "records": len(ds), "stored_bytes": stored,
            "stored_gb_per_s": stored / s_best / 1e9, "f32_bytes": f32, "best_s": f_best,
            "gb_per_s": f32 / f_best / 1e9}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="lmd_latents", description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="a .lmds shard or a dataset directory (index.json or worker-* folders)")
    ap.add_argument("--verify", action="store_true", help="hash every shard against index.json")
    ap.add_argument("--bench", action="store_true", help="time a sequential read of every block")
    ap.add_argument("--repeat", type=int, default=3, help="bench repetitions (the best is reported)")
    a = ap.parse_args(argv)
    try:
        if os.path.isfile(a.path):
            s = Shard(a.path)
            lat = s.read()
            print(json.dumps({"path": a.path, "records": len(s), "latent_shape": s.meta["latent_shape"],
                              "tensors_per_record": s.tensors, "dtype": s.dtype, "vae": s.meta["vae"],
                              "first_keys": s.keys[:3],
                              "mean": float(lat.astype(np.float64).mean()) if lat.size else None}))
            return 0
        ds = LatentDataset(a.path)
        if a.bench:
            print(json.dumps(bench(ds, a.repeat)))
            return 0
        out = {"path": a.path, "records": len(ds), "shards": len(ds.shards), "latent_shape": list(ds.shape),
               "fields": ds.fields, "variants": ds.variants, "dtype": ds.meta["dtype"],
               "fingerprint": ds.fingerprint, "labels": ds.has_labels}
        if a.verify:
            out["verified_shards"] = ds.verify()
        print(json.dumps(out))
        return 0
    except ShardError as e:
        print(f"lmd_latents: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
