"""PyTorch datasets over lmd latent datasets (torch is imported here only).

- :class:`TorchLatentDataset`: map-style (``torch.utils.data.Dataset``): use it with a
  ``DataLoader(shuffle=True)`` or a ``DistributedSampler``; call ``set_epoch`` each epoch for
  new views/flips/posterior samples.
- :class:`IterableLatentDataset`: iterable, each (rank, DataLoader worker) reads a disjoint,
  contiguous share of the records of one epoch (shuffled by blocks with ``shuffle=True``), so
  a shard block is decompressed once per epoch; ``rank``/``world_size`` default to
  ``torch.distributed`` when it is initialised, else to ``RANK``/``WORLD_SIZE``, else 0/1.
  Every rank yields the same number of samples (the tail is dropped, as DistributedSampler
  with ``drop_last=True``), so no rank waits at the end of an epoch.

Samples are dicts of tensors: ``latent`` float32 ``[C, H, W]``, ``label`` int64, and ``key``
(a str; the default collate makes a list of them).
"""
import os

import numpy as np
import torch
import torch.utils.data as tud

from .dataset import LatentDataset


def _to_torch(s):
    out = {"latent": torch.from_numpy(np.ascontiguousarray(s["latent"])),
           "label": torch.tensor(s["label"], dtype=torch.int64), "key": s["key"]}
    for k in ("mean", "logvar"):
        if k in s:
            out[k] = torch.from_numpy(np.ascontiguousarray(s[k]))
    return out


class TorchLatentDataset(tud.Dataset):
    """Map-style: ``ds[i]`` is record ``i`` as tensors (see the module doc)."""

    def __init__(self, paths, **kw):
        self.ds = LatentDataset(paths, **kw)

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return _to_torch(self.ds[int(i)])

    def set_epoch(self, epoch):
        self.ds.set_epoch(epoch)


def _dist_rank_world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class IterableLatentDataset(tud.IterableDataset):
    """Iterable: each rank and DataLoader worker takes its own share (see the module doc)."""

    def __init__(self, paths, shuffle=True, seed=0, rank=None, world_size=None, **kw):
        self.ds = LatentDataset(paths, seed=seed, **kw)
        self.shuffle = shuffle
        self.seed = int(seed)
        r, w = _dist_rank_world()
        self.rank = r if rank is None else int(rank)
        self.world_size = w if world_size is None else int(world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} of world_size {self.world_size}")
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)
        self.ds.set_epoch(epoch)

    def order(self):
        """This epoch's record order for all ranks: blocks shuffled by (seed, epoch), records
        within each block in a shuffled order too (numpy's PCG64 from the same pair)."""
        ds = self.ds
        blocks = []
        for s, sh in enumerate(ds.shards):
            base = int(ds.starts[s])
            for k in range(len(sh.blocks)):
                first = base + int(sh.block_first[k])
                blocks.append(np.arange(first, first + int(sh.blocks[k]["n"])))
        if not self.shuffle:
            return np.concatenate(blocks) if blocks else np.zeros(0, np.int64)
        rng = np.random.default_rng([self.seed, self.epoch])
        perm = rng.permutation(len(blocks))
        return np.concatenate([rng.permutation(blocks[p]) for p in perm]) if blocks else np.zeros(0, np.int64)

    def shares(self, num_workers=1):
        """The indices each (rank, worker) reads this epoch: a list over workers for this rank."""
        order = self.order()
        per_rank = len(order) // self.world_size
        mine = order[self.rank * per_rank : (self.rank + 1) * per_rank]
        return list(np.array_split(mine, num_workers))

    def __len__(self):
        return len(self.ds) // self.world_size

    def __iter__(self):
        info = tud.get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        for i in self.shares(nw)[wid]:
            yield _to_torch(self.ds[int(i)])
