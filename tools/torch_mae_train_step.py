"""Baseline for `lmd-bench train-step --torch-anchor`: the official MAE model (models_mae.py with
timm 0.3.2's ViT Block: explicit q@k^T softmax attention, qkv bias, exact GELU, LayerNorm eps
1e-6) trained in PyTorch, same sizes as ours (lmd-bench passes them). Full steps: forward,
backward, AdamW.

Prints one JSON line per mask ratio: {"baseline": "pytorch", "mask_ratio", "samples_per_s", ...}.

usage: torch_mae_train_step.py [--batch 64] [--ratios 0.75,0.15] [--steps 3] [--threads 2] [--sdpa]
         [--device cpu|cuda[:N]] [--precision f32|bf16] [--compile]
         [--chans 4 --size 28 --patch 2 --dim 192 --depth 12 --heads 3 --ddim 128 --ddepth 4 --dheads 4]

--sdpa: attention by F.scaled_dot_product_attention (newer timm's fused kernel) instead of the
official code's explicit softmax, to see how much PyTorch gains from it.
--precision bf16: torch.autocast(bf16) around the forward and loss (MAE's own scripts use
autocast with fp16 and a grad scaler; bf16 needs no scaler), f32 weights and AdamW state.
--compile: torch.compile the model (the moonshot baseline).
The defaults are lmd's `tiny` preset (ViT-Ti, patch 2 on 4x28x28, decoder 128 x 4).
"""
import argparse, json, math, time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    sdpa = False  # set from --sdpa: F.scaled_dot_product_attention instead of the explicit softmax

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.sdpa:
            o = F.scaled_dot_product_attention(q, k, v)
            return self.proj(o.transpose(1, 2).reshape(b, n, c))
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        h = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, h), nn.GELU(), nn.Linear(h, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Mae(nn.Module):
    """models_mae.MaskedAutoencoderViT, minus the sin-cos init (timing only)."""

    def __init__(self, chans=4, size=28, patch=2, dim=192, depth=12, heads=3, ddim=128, ddepth=4,
                 dheads=4, norm_pix_loss=True):
        super().__init__()
        self.p, self.chans, self.norm_pix_loss = patch, chans, norm_pix_loss
        n = (size // patch) ** 2
        self.patch_embed = nn.Conv2d(chans, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_embed = nn.Linear(dim, ddim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, ddim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, ddim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(ddim, dheads) for _ in range(ddepth)])
        self.decoder_norm = nn.LayerNorm(ddim, eps=1e-6)
        self.decoder_pred = nn.Linear(ddim, patch * patch * chans)
        torch.nn.init.normal_(self.cls_token, std=0.02)
        torch.nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, imgs):
        p, c = self.p, self.chans
        h = w = imgs.shape[2] // p
        x = imgs.reshape(imgs.shape[0], c, h, p, w, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], h * w, p * p * c)

    def forward(self, imgs, mask_ratio):
        x = self.patch_embed(imgs).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:, :]
        n, l, d = x.shape
        keep = int(l * (1 - mask_ratio))
        noise = torch.rand(n, l, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, d))
        mask = torch.ones(n, l, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(n, -1, -1)
        x = torch.cat((cls, x), dim=1)
        for b in self.blocks:
            x = b(x)
        x = self.decoder_embed(self.norm(x))
        toks = self.mask_token.repeat(n, l + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], toks], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for b in self.decoder_blocks:
            x = b(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:, :]
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred.float() - target.float()) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ratios", default="0.75,0.15")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: PyTorch's default)")
    ap.add_argument("--sdpa", action="store_true", help="fused attention (F.scaled_dot_product_attention)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--precision", default="f32", choices=["f32", "bf16"], help="bf16: autocast")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    for k, v in [("chans", 4), ("size", 28), ("patch", 2), ("dim", 192), ("depth", 12), ("heads", 3),
                 ("ddim", 128), ("ddepth", 4), ("dheads", 4)]:
        ap.add_argument(f"--{k}", type=int, default=v)
    a = ap.parse_args()
    Attention.sdpa = a.sdpa
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda:
        # the same matmul precision as lmd's GPU default (TF32 for f32 products)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    model = Mae(chans=a.chans, size=a.size, patch=a.patch, dim=a.dim, depth=a.depth, heads=a.heads,
                ddim=a.ddim, ddepth=a.ddepth, dheads=a.dheads).to(dev)
    fwd = torch.compile(model) if a.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    x = torch.randn(a.batch, a.chans, a.size, a.size, device=dev)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for r in [float(s) for s in a.ratios.replace(" ", ",").split(",") if s]:
        def step():
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.precision == "bf16"):
                loss = fwd(x, r)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.item()
        step()  # warm-up (and compilation)
        sync()
        t = time.perf_counter()
        for _ in range(a.steps):
            loss = step()
        sync()
        dt = (time.perf_counter() - t) / a.steps
        print(json.dumps({"baseline": "pytorch", "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "device": str(dev), "precision": a.precision, "compile": a.compile,
                          "attention": "sdpa" if Attention.sdpa else "explicit",
                          "tokens": (a.size // a.patch) ** 2,
                          "batch": a.batch, "mask_ratio": r, "s_per_step": dt,
                          "samples_per_s": a.batch / dt, "loss": loss}), flush=True)


if __name__ == "__main__":
    main()
