"""Baseline for the device check's VAE figures: VAE encode images/s in PyTorch on the same card
as `lmd-bench vae`, one JSON line per VAE.

- taesd: TAESD's encoder (madebyollin/taesd's taesd.py, the architecture diffusers'
  AutoencoderTiny wraps) in plain PyTorch, loaded from taesd_encoder.safetensors with no
  dependency beyond torch. `--check VECTORS` first compares it with the PyTorch reference
  latents of ../shared/testvectors/taesd_imagenette_val16.safetensors (a self-test).
- sd-vae: diffusers' AutoencoderKL from a diffusers vae/ folder, or `--weights random`: SD's
  sizes with random weights, for throughput only (needs diffusers; without it the line says
  so and gives no figure).

usage: torch_vae_encode.py --vae taesd|sd-vae --weights DIR [--batch 16] [--size 224]
         [--seconds 10] [--device cpu|cuda[:N]] [--precision f32|bf16|f16] [--threads N]
         [--check VECTORS]
"""
import argparse, json, struct, time

import torch
import torch.nn as nn

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "U8": torch.uint8}


def load_safetensors(path):
    """The tensors of a .safetensors file (8-byte header size, JSON header, raw data)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        s, e = v["data_offsets"]
        t = torch.frombuffer(bytearray(data[s:e]), dtype=DTYPES[v["dtype"]])
        out[k] = t.reshape(v["shape"])
    return out


def conv(n_in, n_out, **kw):
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)


class Block(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


def taesd_encoder(latent_channels=4):
    down = lambda: [conv(64, 64, stride=2, bias=False), Block(64, 64), Block(64, 64), Block(64, 64)]
    return nn.Sequential(conv(3, 64), Block(64, 64), *down(), *down(), *down(), conv(64, latent_channels))


def load_vae(kind, weights, dev, dtype):
    """(encode: images in [0, 1] -> latents, name)."""
    if kind == "taesd":
        m = taesd_encoder()
        m.load_state_dict({k: v.float() for k, v in load_safetensors(f"{weights}/taesd_encoder.safetensors").items()})
        m = m.to(dev, dtype).eval()
        return (lambda x: m(x)), "taesd (plain PyTorch, taesd.py's encoder)"
    from diffusers import AutoencoderKL  # noqa: the line says so when this fails
    if weights == "random":
        # Stable Diffusion's VAE sizes, random weights: for throughput only (as `lmd-bench vae
        # --vae-weights random`)
        m = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                          block_out_channels=(128, 256, 512, 512), norm_num_groups=32,
                          down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    else:
        m = AutoencoderKL.from_pretrained(weights)
    m = m.to(dev, dtype).eval()
    return (lambda x: m.encode(x * 2 - 1).latent_dist.mean * m.config.scaling_factor), "sd-vae (diffusers AutoencoderKL)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vae", default="taesd", choices=["taesd", "sd-vae"])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="f32", choices=["f32", "bf16", "f16"])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--check", help="taesd_imagenette_val16.safetensors: compare with its latents first")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[a.precision]
    line = {"baseline": "pytorch", "torch": torch.__version__, "vae": a.vae, "device": str(dev),
            "precision": a.precision, "batch": a.batch, "size": a.size, "threads": torch.get_num_threads()}
    try:
        encode, name = load_vae(a.vae, a.weights, dev, dtype)
    except ImportError as e:
        line["skipped"] = f"{e}"
        print(json.dumps(line), flush=True)
        return
    line["model"] = name
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.no_grad():
        if a.check:
            v = load_safetensors(a.check)
            x = v["images"].permute(0, 3, 1, 2).float().div(255).to(dev, dtype)
            z = encode(x).float().cpu()
            ref = v["latents"].float()
            line["check_max_abs_err"] = float((z - ref).abs().max())
            line["check_rel_rms_err"] = float(((z - ref).pow(2).mean() / ref.pow(2).mean()).sqrt())
        x = torch.rand(a.batch, 3, a.size, a.size, device=dev, dtype=dtype)
        encode(x)
        sync()
        t, n = time.perf_counter(), 0
        while time.perf_counter() - t < a.seconds or n == 0:
            encode(x)
            n += a.batch
        sync()
        line["encode_images_per_s"] = n / (time.perf_counter() - t)
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
