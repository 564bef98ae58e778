"""Latent datasets: an ``lmd-precompute`` output directory as one indexable collection.

A dataset directory holds ``index.json`` (the manifest) and its shards; a precompute run with
several workers leaves ``worker-I-of-N/`` folders, each a dataset: :func:`find_datasets` finds
them as ``lmd-train`` does. :class:`LatentDataset` checks each manifest against its shards
(records, bytes, fingerprint; all folders must share one fingerprint) and gives record ``i`` as
``{"latent": float32 [C, H, W], "label": int (-1 without labels), "key": str}``.

Records with several views and/or flips give one variant per epoch, and ``mean``+``logvar``
records are sampled ``mean + exp(logvar / 2) * eps``, both drawn from ``(seed, epoch, index)``
with the same generator as lmd's own loader, so Python and ``lmd-train`` see the same sample
for the same seed, epoch and record. Stored latents with ``scaling.applied = false`` are
multiplied by ``scaling.factor``.
"""
import json
import os

import numpy as np
import xxhash

from .shard import Shard, ShardError

MANIFEST = "index.json"
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def find_datasets(path):
    """The dataset directories under ``path``: itself when it has ``index.json``, else its
    subdirectories that have one (``worker-*``), sorted. Raises ``ShardError`` if none."""
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return [path]
    if not os.path.isdir(path):
        raise ShardError(f"{path}: no such directory")
    subs = sorted(
        os.path.join(path, d)
        for d in os.listdir(path)
        if os.path.isfile(os.path.join(path, d, MANIFEST))
    )
    if not subs:
        raise ShardError(f"{path}: no index.json (not a latent dataset)")
    return subs


def _splitmix_outputs(state, count):
    """The next ``count`` outputs of lmd's SplitMix64 generator from ``state`` (numpy uint64)."""
    with np.errstate(over="ignore"):
        z = np.uint64(state) + _GOLDEN * np.arange(1, count + 1, dtype=np.uint64)
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def sample_seed(seed, epoch, index):
    """The generator state for record ``index`` in ``epoch`` (lmd's loader: xxh3 of the three
    little-endian u64s, the index offset by 2**40)."""
    b = (int(seed) % 2**64).to_bytes(8, "little") + (int(epoch) % 2**64).to_bytes(8, "little")
    b += ((int(index) + (1 << 40)) % 2**64).to_bytes(8, "little")
    return xxhash.xxh3_64_intdigest(b)


class LatentDataset:
    """A map-style dataset over one or more latent dataset directories (``worker-*`` found).

    ``variant``: ``"sample"`` (one view/flip per epoch, from ``(seed, epoch, index)``, as
    lmd-train) or an int (that view/flip index always) or ``"all"`` (``latent`` is then
    ``[variants, C, H, W]``). ``posterior``: ``"sample"`` (mean + std * eps, as lmd-train),
    ``"mean"``, or ``"both"`` (``mean`` and ``logvar`` in the sample too); only for
    ``mean``+``logvar`` records. ``verify``: check block checksums on read (on by default).
    """

    def __init__(self, paths, seed=0, variant="sample", posterior="sample", verify=True):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        dirs = [d for p in paths for d in find_datasets(p)]
        self.seed = int(seed)
        self.epoch = 0
        self.variant = variant
        self.posterior = posterior
        self.shards = []
        self.fingerprint = None
        self.meta = None
        self._manifests = []
        for d in dirs:
            mpath = os.path.join(d, MANIFEST)
            try:
                with open(mpath) as f:
                    m = json.load(f)
            except (OSError, ValueError) as e:
                raise ShardError(f"{mpath}: {e}") from None
            if m.get("format") != "lmd-latent-dataset":
                raise ShardError(f"{mpath}: not an lmd latent dataset manifest")
            if self.fingerprint is None:
                self.fingerprint, self.meta = m["fingerprint"], m["meta"]
            elif m["fingerprint"] != self.fingerprint:
                raise ShardError(
                    f"{mpath}: fingerprint {m['fingerprint']} differs from {self.fingerprint} "
                    f"({self._manifests[0]}): the folders hold different latents")
            self._manifests.append(mpath)
            for s in m["shards"]:
                p = os.path.join(d, s["file"])
                try:
                    size = os.path.getsize(p)
                except OSError as e:
                    raise ShardError(f"{mpath}: shard {s['file']}: {e}") from None
                if size != s["bytes"]:
                    raise ShardError(f"{mpath}: shard {s['file']}: {size} bytes, the manifest says {s['bytes']}")
                sh = Shard(p, verify=verify)
                if len(sh) != s["records"]:
                    raise ShardError(f"{mpath}: shard {s['file']}: {len(sh)} records, the manifest says {s['records']}")
                sh.manifest_hash = s.get("xxh3_128")
                self.shards.append(sh)
        if self.meta is None:
            raise ShardError(f"{paths}: no dataset")
        self.starts = np.cumsum([0] + [len(s) for s in self.shards]).astype(np.int64)
        lay = self.meta["layout"]
        self.fields = list(lay["fields"])
        self.variants = int(lay["views"]) * (2 if lay["flip"] else 1)
        self.is_posterior = "mean" in self.fields and "logvar" in self.fields
        sc = self.meta.get("scaling", {"factor": 1.0, "applied": True})
        self.scale = 1.0 if sc.get("applied", True) else float(sc["factor"])
        self.shape = tuple(self.meta["latent_shape"])
        self.has_labels = bool(self.meta.get("labels", False))
        self._cache = (None, None)

    def __len__(self):
        return int(self.starts[-1])

    def set_epoch(self, epoch):
        """Pick the variants and posterior samples of ``epoch`` (as lmd-train's loader)."""
        self.epoch = int(epoch)

    def locate(self, i):
        """(shard number, record within it) of global record ``i``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range ({n} records)")
        i %= n
        s = int(np.searchsorted(self.starts, i, side="right") - 1)
        return s, i - int(self.starts[s])

    def _block(self, s, k):
        key = (s, k)
        if self._cache[0] != key:
            self._cache = (key, self.shards[s].block(k))
        return self._cache[1]

    def record(self, i):
        """Record ``i`` as stored: float32 ``[tensors, C, H, W]`` (nested view, flip, field)."""
        s, r = self.locate(i)
        sh = self.shards[s]
        k = sh.block_of(r)
        return self._block(s, k)[r - int(sh.block_first[k])]

    def key(self, i):
        s, r = self.locate(i)
        return self.shards[s].keys[r]

    def label(self, i):
        s, r = self.locate(i)
        lab = self.shards[s].labels
        return int(lab[r]) if lab is not None else -1

    def __getitem__(self, i):
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"index must be an int, not {type(i).__name__}")
        i = int(i) % len(self) if -len(self) <= int(i) < len(self) else int(i)
        rec = self.record(i)
        nf = len(self.fields)
        out = {"key": self.key(i), "label": self.label(i)}
        state = sample_seed(self.seed, self.epoch, i)
        n_el = int(np.prod(self.shape))
        if self.variant == "all":
            sel = rec.reshape((self.variants, nf) + self.shape)
            variant = None
        else:
            if self.variant == "sample":
                variant = int(_splitmix_outputs(state, 1)[0] % np.uint64(self.variants))
            else:
                variant = int(self.variant)
                if not 0 <= variant < self.variants:
                    raise IndexError(f"variant {variant}: records have {self.variants}")
            sel = rec[variant * nf : (variant + 1) * nf]
            out["variant"] = variant
        fi = {f: j for j, f in enumerate(self.fields)}
        take = (lambda f: sel[..., fi[f], :, :, :]) if variant is None else (lambda f: sel[fi[f]])
        if self.is_posterior:
            mean, logvar = take("mean"), take("logvar")
            if self.posterior == "sample" and variant is not None:
                u = _splitmix_outputs(state, 1 + 2 * n_el)[1:]
                u1 = ((u[0::2] >> np.uint64(11)).astype(np.float64) + 1.0) / float(1 << 53)
                u2 = (u[1::2] >> np.uint64(11)).astype(np.float64) / float(1 << 53)
                eps = (np.sqrt(-2.0 * np.log(u1)) * np.cos(2 * np.pi * u2)).astype(np.float32)
                lat = mean + np.exp(np.float32(0.5) * logvar) * eps.reshape(self.shape)
            else:
                lat = mean.copy()
            if self.posterior == "both":
                out["mean"], out["logvar"] = mean * np.float32(self.scale), logvar
        else:
            lat = np.array(take(self.fields[0]), dtype=np.float32, copy=True)
        if self.scale != 1.0:
            lat = lat * np.float32(self.scale)
        out["latent"] = lat
        return out

    def verify(self):
        """Hash every shard file (XXH3-128) against its manifest entry; returns the number
        checked, raises ``ShardError`` naming the first that differs."""
        n = 0
        for sh in self.shards:
            if sh.manifest_hash is None:
                continue
            h = xxhash.xxh3_128()
            with open(sh.path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
            if h.hexdigest() != sh.manifest_hash:
                raise ShardError(f"{sh.path}: xxh3_128 {h.hexdigest()}, the manifest says {sh.manifest_hash}")
            n += 1
        return n

    def iter_records(self, indices=None):
        """Stored records in order (or of ``indices``), block by block: yields ``(index,
        float32 [tensors, C, H, W])``; each block is decompressed once."""
        idx = range(len(self)) if indices is None else indices
        for i in idx:
            yield i, self.record(i)
