"""Tests of lmd_latents on fixtures written by the Rust writer (``tests/python_package.rs``
makes them and runs this file with ``LMD_PY_FIXTURES`` set). numpy only, except the torch
wrapper tests, which run where torch imports (``LMD_REQUIRE_TORCH=1`` makes a missing torch a
failure)."""
import json
import os
import re
import subprocess
import sys
import unittest

import numpy as np

FIX = os.environ.get("LMD_PY_FIXTURES")
if not FIX:
    raise RuntimeError("LMD_PY_FIXTURES is not set: run `cargo test --test python_package`, which writes the fixtures")


def values(r, n):
    """The values the Rust test stores for record r (tests/python_package.rs `values`)."""
    j = np.arange(n, dtype=np.float32)
    return np.sin(j * np.float32(0.37) + np.float32(r)) * np.float32(2.5) + (np.arange(n) % 7).astype(np.float32) * np.float32(0.01) - np.float32(0.5)


def f16(x):
    return x.astype(np.float16).astype(np.float32)


def bf16(x):
    """Round to nearest even bf16, as the Rust writer (half::bf16::from_f32)."""
    b = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return (b.astype(np.uint32) << 16).view(np.float32)


def torch_available():
    try:
        import torch  # noqa: F401
        return True
    except Exception:
        if os.environ.get("LMD_REQUIRE_TORCH") == "1":
            raise
        return False


class Reader(unittest.TestCase):
    def test_torch_is_not_imported_by_the_numpy_api(self):
        code = ("import sys, lmd_latents; ds = lmd_latents.LatentDataset(sys.argv[1]); ds[0]; "
                "assert 'torch' not in sys.modules, 'torch imported'")
        subprocess.run([sys.executable, "-c", code, os.path.join(FIX, "plain")], check=True,
                       env=dict(os.environ))

    def test_read_gives_the_stored_values_keys_and_labels(self):
        from lmd_latents import read
        d = read(os.path.join(FIX, "plain/worker-0-of-2/shard-000001.lmds"))
        self.assertEqual(d["latents"].shape, (5, 1, 4, 3, 5))
        self.assertEqual(d["keys"], [f"rec-{r:04}" for r in range(5, 10)])
        self.assertEqual(list(d["labels"]), [r % 10 for r in range(5, 10)])
        for i, r in enumerate(range(5, 10)):
            np.testing.assert_array_equal(d["latents"][i].reshape(-1), f16(values(r, 60)))

    def test_bf16_posterior_records_nest_view_flip_field(self):
        from lmd_latents import Shard
        s = Shard(os.path.join(FIX, "posterior/shard-000000.lmds"))
        self.assertEqual((s.tensors, s.fields, s.views, s.flip), (8, ["mean", "logvar"], 2, True))
        lat = s.read()
        np.testing.assert_array_equal(lat[3].reshape(-1), bf16(values(103, 8 * 60)))

    def test_worker_folders_are_one_dataset_in_lmd_trains_order(self):
        from lmd_latents import LatentDataset, find_datasets
        self.assertEqual([os.path.basename(p) for p in find_datasets(os.path.join(FIX, "plain"))],
                         ["worker-0-of-2", "worker-1-of-2"])
        ds = LatentDataset(os.path.join(FIX, "plain"))
        self.assertEqual(len(ds), 17)
        self.assertEqual([ds.key(i) for i in range(len(ds))],
                         [f"rec-{r:04}" for r in list(range(10)) + list(range(10, 17))])
        s = ds[12]
        self.assertEqual((s["key"], s["label"], s["latent"].shape, s["latent"].dtype),
                         ("rec-0012", 2, (4, 3, 5), np.float32))
        self.assertEqual(ds.verify(), 3)
        with self.assertRaises(IndexError):
            ds[17]

    def test_samples_equal_the_rust_loaders_for_the_same_seed_and_epoch(self):
        from lmd_latents import LatentDataset
        with open(os.path.join(FIX, "expected.json")) as f:
            exp = json.load(f)
        for name in ["plain", "posterior"]:
            ds = LatentDataset(os.path.join(FIX, name), seed=7)
            for epoch in [0, 1]:
                ds.set_epoch(epoch)
                want = exp[f"{name}-seed7-epoch{epoch}"]
                self.assertEqual(len(want), len(ds))
                for i in range(len(ds)):
                    s = ds[i]
                    np.testing.assert_allclose(s["latent"].reshape(-1), np.array(want[s["key"]], np.float32),
                                               rtol=2e-6, atol=2e-6, err_msg=f"{name} epoch {epoch} {s['key']}")
        # the variants differ between epochs (2 views x flip: 4 choices)
        ds = LatentDataset(os.path.join(FIX, "posterior"), seed=7)
        v0 = [ds[i]["variant"] for i in range(len(ds))]
        ds.set_epoch(1)
        v1 = [ds[i]["variant"] for i in range(len(ds))]
        self.assertNotEqual(v0, v1)
        self.assertTrue(set(v0 + v1) <= {0, 1, 2, 3})

    def test_fixed_variant_and_posterior_mean_with_scaling(self):
        from lmd_latents import LatentDataset
        ds = LatentDataset(os.path.join(FIX, "posterior"), variant=3, posterior="both")
        s = ds[0]
        rec = bf16(values(100, 8 * 60)).reshape(8, 4, 3, 5)
        np.testing.assert_allclose(s["mean"], rec[6] * np.float32(0.18215), rtol=1e-6)
        np.testing.assert_array_equal(s["logvar"], rec[7])
        ds = LatentDataset(os.path.join(FIX, "posterior"), variant="all", posterior="mean")
        self.assertEqual(ds[0]["latent"].shape, (4, 4, 3, 5))

    def test_a_corrupt_block_is_named_with_file_block_and_offset(self):
        from lmd_latents import LatentDataset, ShardError
        ds = LatentDataset(os.path.join(FIX, "corrupt"))
        errs = []
        for i in range(len(ds)):
            try:
                ds[i]
            except ShardError as e:
                errs.append(str(e))
        self.assertTrue(errs, "the flipped byte was not caught")
        self.assertTrue(all(re.search(r"shard-000000\.lmds: block \d+ at byte \d+", e) for e in errs), errs)
        self.assertLess(len(errs), len(ds), "only the damaged block fails")
        with self.assertRaises(ShardError) as cm:
            ds.verify()
        self.assertIn("xxh3_128", str(cm.exception))

    def test_a_truncated_shard_is_refused(self):
        from lmd_latents import LatentDataset, ShardError
        with self.assertRaises(ShardError) as cm:
            LatentDataset(os.path.join(FIX, "truncated"))
        self.assertIn("shard-000000.lmds", str(cm.exception))

    def test_cli_summary_and_bench(self):
        out = subprocess.run([sys.executable, "-m", "lmd_latents", os.path.join(FIX, "plain"), "--verify"],
                             check=True, capture_output=True, text=True).stdout
        d = json.loads(out)
        self.assertEqual((d["records"], d["shards"], d["verified_shards"]), (17, 3, 3))
        out = subprocess.run([sys.executable, "-m", "lmd_latents", os.path.join(FIX, "plain"), "--bench", "--repeat", "1"],
                             check=True, capture_output=True, text=True).stdout
        b = json.loads(out)
        self.assertEqual((b["f32_bytes"], b["stored_bytes"]), (17 * 60 * 4, 17 * 60 * 2))
        self.assertGreater(b["gb_per_s"], 0)

    def test_readme_use_from_pytorch_numpy_snippet_runs(self):
        with open(os.environ["LMD_README"]) as f:
            text = f.read()
        m = re.search(r"<!-- checked: numpy -->\s*```python\n(.*?)```", text, re.S)
        self.assertIsNotNone(m, "README has no numpy snippet marked <!-- checked: numpy -->")
        code = m.group(1).replace("/data/latents/train", os.path.join(FIX, "plain"))
        exec(compile(code, "README.md", "exec"), {})


@unittest.skipUnless(torch_available(), "torch is not installed (LMD_REQUIRE_TORCH=1 makes this a failure)")
class TorchWrappers(unittest.TestCase):
    def test_map_style_dataset_in_a_dataloader(self):
        import torch
        from lmd_latents.torch import TorchLatentDataset
        ds = TorchLatentDataset(os.path.join(FIX, "plain"))
        dl = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, num_workers=2)
        keys, n = set(), 0
        for b in dl:
            self.assertEqual(b["latent"].dtype, torch.float32)
            self.assertEqual(tuple(b["latent"].shape[1:]), (4, 3, 5))
            keys.update(b["key"])
            n += len(b["key"])
        self.assertEqual((n, len(keys)), (17, 17))

    def test_iterable_shares_are_disjoint_across_ranks_and_workers(self):
        import torch
        from lmd_latents.torch import IterableLatentDataset
        seen = []
        for rank in range(2):
            ds = IterableLatentDataset(os.path.join(FIX, "plain"), rank=rank, world_size=2, seed=1)
            ds.set_epoch(3)
            dl = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
            keys = [k for b in dl for k in b["key"]]
            self.assertEqual(len(keys), 8)  # 17 // 2, the same on every rank
            seen.append(keys)
        self.assertFalse(set(seen[0]) & set(seen[1]))
        again = IterableLatentDataset(os.path.join(FIX, "plain"), rank=0, world_size=2, seed=1)
        again.set_epoch(3)
        self.assertEqual(sorted(k for b in torch.utils.data.DataLoader(again, batch_size=3, num_workers=2)
                                for k in b["key"]), sorted(seen[0]))

    def test_readme_torch_snippet_runs(self):
        with open(os.environ["LMD_README"]) as f:
            text = f.read()
        m = re.search(r"<!-- checked: torch -->\s*```python\n(.*?)```", text, re.S)
        self.assertIsNotNone(m, "README has no torch snippet marked <!-- checked: torch -->")
        code = m.group(1).replace("/data/latents/train", os.path.join(FIX, "plain"))
        exec(compile(code, "README.md", "exec"), {})


if __name__ == "__main__":
    unittest.main()
