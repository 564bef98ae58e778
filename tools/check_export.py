#!/usr/bin/env python3
"""Load an `lmd-export` output into PyTorch, strictly, and compare its forward with lmd's.

    python3 tools/check_export.py OUT [OUT ...]

For each OUT (written by `lmd-export ... --out OUT --reference`) it reads `OUT.json` (the model
arguments) and `OUT.reference.safetensors` (a seeded input `x` and lmd's outputs for it), builds
- encoders/classifiers: timm's `VisionTransformer` and MAE's `models_vit.VisionTransformer`
  (the official subclass, reproduced below on current timm), each loaded with `strict=True`,
  and compares the pooled features (and logits when there is a head);
- full MAEs: MAE's `models_mae.MaskedAutoencoderViT` (the official code on timm's `PatchEmbed`
  and `Block`, with the masking noise passed in), loaded with `strict=True`, and compares
  `latent`, `pred`, `mask` and `loss` for the reference noise and mask ratio.
Prints one JSON line per (file, model) with the max abs differences; exits 1 if any exceeds
`--tol` (1e-4). Needs torch, timm, safetensors, numpy.
"""
import argparse
import json
import sys
from functools import partial

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file
from timm.models.vision_transformer import Block, PatchEmbed, VisionTransformer


def load_state(path):
    if str(path).endswith((".pth", ".pt")):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        return obj["model"] if "model" in obj else obj
    return load_file(path)


class MaeVisionTransformer(VisionTransformer):
    """MAE's models_vit.VisionTransformer (global_pool as a bool; fc_norm replaces norm)."""

    def __init__(self, global_pool=False, **kwargs):
        super().__init__(**kwargs)
        self.global_pool = global_pool
        if self.global_pool:
            norm_layer = kwargs["norm_layer"]
            embed_dim = kwargs["embed_dim"]
            self.fc_norm = norm_layer(embed_dim)
            del self.norm

    def forward_features(self, x):
        B = x.shape[0]
        x = self.patch_embed(x)
        cls_tokens = self.cls_token.expand(B, -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        x = x + self.pos_embed
        x = self.pos_drop(x)
        for blk in self.blocks:
            x = blk(x)
        if self.global_pool:
            x = x[:, 1:, :].mean(dim=1)
            outcome = self.fc_norm(x)
        else:
            x = self.norm(x)
            outcome = x[:, 0]
        return outcome


class MaskedAutoencoderViT(nn.Module):
    """MAE's models_mae.MaskedAutoencoderViT (official code; `noise` may be passed in)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                 norm_layer=nn.LayerNorm, norm_pix_loss=False):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                                     for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True,
                                                   norm_layer=norm_layer) for i in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)
        self.norm_pix_loss = norm_pix_loss
        self.in_chans = in_chans

    def patchify(self, imgs):
        p = self.patch_embed.patch_size[0]
        h = w = imgs.shape[2] // p
        x = imgs.reshape(shape=(imgs.shape[0], self.in_chans, h, p, w, p))
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(shape=(imgs.shape[0], h * w, p ** 2 * self.in_chans))

    def random_masking(self, x, mask_ratio, noise):
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones([N, L], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward_encoder(self, x, mask_ratio, noise):
        x = self.patch_embed(x)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        cls_tokens = cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls_tokens, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = (pred - target) ** 2
        loss = loss.mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio, noise):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask, latent


def maxdiff(a, b):
    return float((a.double() - b.double()).abs().max())


def check(out, tol):
    side = json.load(open(str(out).rsplit(".", 1)[0] + ".json"))
    ref = load_file(str(out).rsplit(".", 1)[0] + ".reference.safetensors")
    sd = load_state(out)
    a = side["model_args"]
    x = ref["x"]
    rows = []
    with torch.no_grad():
        if side["module"].startswith("models_mae"):
            m = MaskedAutoencoderViT(
                img_size=a["img_size"], patch_size=a["patch_size"], in_chans=a["in_chans"], embed_dim=a["embed_dim"],
                depth=a["depth"], num_heads=a["num_heads"], decoder_embed_dim=a["decoder_embed_dim"],
                decoder_depth=a["decoder_depth"], decoder_num_heads=a["decoder_num_heads"], mlp_ratio=a["mlp_ratio"],
                norm_layer=partial(nn.LayerNorm, eps=a["norm_eps"]), norm_pix_loss=a["norm_pix_loss"])
            m.load_state_dict(sd, strict=True)
            m.eval()
            loss, pred, mask, latent = m(x, float(ref["mask_ratio"]), ref["noise"])
            d = {"latent": maxdiff(latent, ref["latent"]), "pred": maxdiff(pred, ref["pred"]),
                 "mask": maxdiff(mask, ref["mask"]), "loss": maxdiff(loss, ref["loss"])}
            rows.append({"file": str(out), "model": "models_mae.MaskedAutoencoderViT", "strict": True, **d})
        else:
            kw = dict(img_size=tuple(a["img_size"]), patch_size=a["patch_size"], in_chans=a["in_chans"],
                      embed_dim=a["embed_dim"], depth=a["depth"], num_heads=a["num_heads"], mlp_ratio=a["mlp_ratio"],
                      qkv_bias=True, num_classes=a["num_classes"], norm_layer=partial(nn.LayerNorm, eps=a["norm_eps"]))
            t = VisionTransformer(global_pool=a["global_pool"], **kw)
            t.load_state_dict(sd, strict=True)
            t.eval()
            feats = t.forward_head(t.forward_features(x), pre_logits=True)
            d = {"features": maxdiff(feats, ref["features"])}
            if "logits" in ref:
                d["logits"] = maxdiff(t(x), ref["logits"])
            rows.append({"file": str(out), "model": "timm.VisionTransformer", "timm": __import__("timm").__version__,
                         "strict": True, **d})
            v = MaeVisionTransformer(global_pool=a["global_pool"] == "avg", **kw)
            v.load_state_dict(sd, strict=True)
            v.eval()
            f2 = v.forward_features(x)
            d = {"features": maxdiff(f2, ref["features"])}
            if "logits" in ref:
                d["logits"] = maxdiff(v.head(f2), ref["logits"])
            rows.append({"file": str(out), "model": "models_vit.VisionTransformer", "strict": True, **d})
    ok = True
    for r in rows:
        worst = max(v for k, v in r.items() if isinstance(v, float))
        r["ok"] = worst <= tol
        ok &= r["ok"]
        print(json.dumps(r))
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outs", nargs="+")
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()
    ok = all([check(o, a.tol) for o in a.outs])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
