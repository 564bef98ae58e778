"""Read lmd latent shards and datasets: numpy arrays, with PyTorch wrappers in ``lmd_latents.torch``.

    from lmd_latents import read, LatentDataset
    d = read("shard-000000.lmds")   # the whole shard: latents [N, T, C, H, W], labels, keys, meta
    ds = LatentDataset("latents/train")
    ds[0]                           # {"latent": float32 [C, H, W], "label": int, "key": str}
"""
from .shard import Shard, ShardError, read
from .dataset import LatentDataset, find_datasets

__all__ = ["Shard", "ShardError", "read", "LatentDataset", "find_datasets"]
__version__ = "0.1.0"
