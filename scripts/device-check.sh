#!/usr/bin/env bash
# The device check (#16, #17): what lmd does on one GPU, each figure beside its baseline measured
# in the same run, in one call of the device tool (a machine with CUDA, PyTorch and 16 cores but
# no Rust and no network).
#
# 1. Here (Rust, network):   scripts/device-check.sh prepare
#    builds `lmd` (every program in one binary) in release with --features cuda,nccl
#    (scripts/cuda-env.sh; libnccl.so.2 comes from PyTorch's nvidia-nccl wheel there), compresses it, and gathers what the check reads into .device/
#    (ignored by git): ../shared's TAESD weights, test vectors and a few tars, and the diffusers
#    wheel for the SD-VAE baseline. It prints the size that will travel (the limit is 64 MiB).
# 2. There (the device tool): run(command="bash scripts/device-check.sh run", carry=[".device"],
#    timeout_s=540). Steps are cut to fit LMD_CHECK_BUDGET_S (default 500 s from the start, 15 s
#    kept for the summary): a step that no longer fits is skipped and named, so the summary is
#    always written inside the call's limit. It writes $OUT/device-check.jsonl (one JSON line per figure; a
#    {"step", "rc", "ms"} line after each step, so a failed step never hides the others) and
#    $OUT/device-check.log (every step's stderr), and ends with a "summary" line of the ratios.
# 3. A smoke test of the script on a CPU (small sizes, no GPU):
#    LMD_CHECK_DEVICE=cpu LMD_CHECK_SMALL=1 LMD_BIN=target/debug/lmd LMD_CHECK_DATA=../shared \
#      OUT=/tmp/dc scripts/device-check.sh run
#
# What it measures (targets from #16):
# - parity on the device: TAESD, SD-VAE (tiny) and MAE forward/backward against the PyTorch
#   vectors, f32 and bf16 (`lmd bench parity`);
# - NCCL (#17) at one rank: the gradient buckets beside ncclAllReduce on one device buffer,
#   16M values, with the averaged gradients checked (`lmd bench allreduce --device cuda:0`);
# - VAE encode images/s at 224 px, bf16: TAESD and SD-VAE (random weights at SD's sizes), ours
#   beside PyTorch on the same card (tools/torch_vae_encode.py; target TAESD >= 1.5x);
# - train step samples/s, LMD's ViT-B/4 on 4x28x28 (49 tokens, decoder 512 x 8), ratios 0.15
#   and 0.75, bf16, beside tools/torch_mae_train_step.py: eager + autocast (the lmd-bench
#   anchor), then with SDPA, then torch.compile (target >= 1.0x eager);
# - the same train step with the row kernels (LMD_KERNELS=rows, lmd-model/src/rowops: LayerNorm,
#   softmax and GELU one CUDA kernel each way), after their parity on the GPU (`parity-rows`):
#   train_step_rows_vs_candle_<ratio> > 1 (candle's ops timed in the same run) says make
#   them the GPU's default;
# - the AdamW step over that model's parameters, flat (the GPU's default) beside per
#   parameter (`lmd bench optimizer`): per_param_over_flat < 1 says the default is wrong there;
# - precompute of the shared imagenette and ILSVRC sample images repeated to >= 20k, beside the
#   decode-only rate of all cores in the same run (target end to end >= 0.9x decode-only), and
#   the projected ImageNet-1k time (goal <= 5 min);
# - a short pretrain (about 60 s) then fine-tune on the GPU: the loss and top-1 reached.
set -uo pipefail
cd "$(dirname "$0")/.."

prepare() {
  set -e
  local dir=.device
  grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
  rm -rf "$dir" && mkdir -p "$dir/shared/weights" "$dir/shared/testvectors" "$dir/shared/data" "$dir/whl"
  (
    # shellcheck source=cuda-env.sh
    source scripts/cuda-env.sh
    CARGO_TARGET_DIR=target/cuda cargo build --release --features cuda,nccl -p lmd-bin --bin lmd
  )
  # without symbols (~75 MB with every program and the CUDA kernels), then xz (~12 MB)
  strip -o "$dir/lmd" target/cuda/release/lmd
  xz -T0 -6 -c "$dir/lmd" > "$dir/lmd.xz" && rm "$dir/lmd"
  local sh="${LMD_SHARED:-../shared}"
  cp -r "$sh/weights/taesd" "$dir/shared/weights/"
  cp "$sh"/testvectors/{taesd_imagenette_val16,mae_p4_d96.weights,mae_p4_d96.vectors,sdvae_tiny.weights,sdvae_tiny.vectors}.safetensors \
    "$dir/shared/testvectors/"
  mkdir -p "$dir/shared/data/imagenette" "$dir/shared/data/imagenet-samples"
  cp "$sh"/data/imagenette/imagenette-{train-000000,train-000001,val-000000}.tar "$dir/shared/data/imagenette/"
  cp "$sh"/data/imagenet-samples/{ILSVRC-sample_img_val.tar,LOC_synset_mapping.txt,LOC_val_solution.csv} \
    "$dir/shared/data/imagenet-samples/"
  # diffusers (not on the device machine) for the SD-VAE baseline, with the one need it lacks
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --platform any -d "$dir/whl" \
    diffusers==0.36.0 importlib_metadata==8.7.0
  local tree
  tree=$(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1)
  echo "device-check: .device holds $(du -sb "$dir" | cut -f1) bytes, the tracked tree $tree bytes (limit 67108864)"
}

run() {
  : "${OUT:?OUT must name a folder for the results}"
  local dev="${LMD_CHECK_DEVICE:-cuda:0}" small="${LMD_CHECK_SMALL:-0}"
  local data="${LMD_CHECK_DATA:-.device/shared}" py="${LMD_PYTHON:-python3}"
  local J="$OUT/device-check.jsonl" LOG="$OUT/device-check.log" W="${TMPDIR:-/tmp}/lmd-device-check"
  local cores; cores=$(nproc)
  local budget="${LMD_CHECK_BUDGET_S:-500}" t_start; t_start=$(date +%s)
  rm -rf "$W" && mkdir -p "$W" "$OUT"
  : > "$J"; : > "$LOG"
  local lmd="${LMD_BIN:-}"
  if [ -z "$lmd" ]; then
    lmd="$W/lmd"
    "$py" -c 'import lzma, sys; open(sys.argv[2], "wb").write(lzma.open(sys.argv[1]).read())' .device/lmd.xz "$lmd"
    chmod +x "$lmd"
  fi
  lmd="$(cd "$(dirname "$lmd")" && pwd)/$(basename "$lmd")"
  if [ "${dev%%:*}" = cuda ]; then
    # the CUDA libraries lmd links (cudart, cublas, curand, nvrtc) from PyTorch's wheels
    local libs
    libs=$("$py" -c 'import glob, os, nvidia; b = list(nvidia.__path__)[0]; print(":".join(sorted(set(os.path.dirname(p) for p in glob.glob(b + "/**/lib*.so*", recursive=True)))))' 2>>"$LOG")
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
  if compgen -G ".device/whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" .device/whl/*.whl >>"$LOG" 2>&1 &&
      export PYTHONPATH="$W/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  # the torch anchor that `lmd bench train-step --torch-anchor` runs is `python3` on PATH
  # (a wrapper, not a link: a virtual environment's python finds its packages by its own path)
  mkdir -p "$W/py" && printf '#!/bin/sh\nexec "%s" "$@"\n' "$(command -v "$py")" > "$W/py/python3" &&
    chmod +x "$W/py/python3" && export PATH="$W/py:$PATH"
  export PYTHONUNBUFFERED=1

  # step NAME LIMIT_S CMD...: stdout (JSON lines) into the results, stderr into the log; the
  # limit is cut to what is left of the budget (15 s kept for the summary), and a step with
  # under 5 s left is skipped and named
  step() {
    local name=$1 secs=$2 t0 rc left
    shift 2
    left=$(( budget - ($(date +%s) - t_start) - 15 ))
    if [ "$left" -lt 5 ]; then
      printf '{"step": "%s", "skipped": "out of time (LMD_CHECK_BUDGET_S=%s)"}\n' "$name" "$budget" >>"$J"
      echo "device-check: $name skipped: out of time"
      return 0
    fi
    [ "$secs" -gt "$left" ] && secs=$left
    echo "=== $name (limit ${secs}s): $*" >>"$LOG"
    t0=$(date +%s%N)
    timeout "$secs" "$@" >>"$J" 2>>"$LOG"
    rc=$?
    printf '{"step": "%s", "rc": %d, "ms": %d}\n' "$name" "$rc" "$(( ($(date +%s%N) - t0) / 1000000 ))" >>"$J"
    echo "device-check: $name rc $rc"
  }

  # sizes: the real check, or a smoke test of the script on a CPU
  local bvae=64 bsd=8 vsize=224 vsec=5 preset=base_patch4 bstep=256 nstep=10 copies=36
  local psize=224 pretrain_s=60 ft_epochs=3 prec=bf16 torch_prec=bf16 limit=0 vlimit=0 minsteps=20 ostep=10
  if [ "$small" = 1 ]; then
    bvae=2 bsd=1 vsize=64 vsec=0.5 preset=tiny bstep=4 nstep=1 copies=1 psize=32 pretrain_s=5 ft_epochs=1 limit=32 vlimit=16 minsteps=6 ostep=1
    prec=f32 torch_prec=f32
  fi

  step env 60 "$py" - "$lmd" "$dev" <<'EOF'
import json, os, subprocess, sys
lmd, dev = sys.argv[1], sys.argv[2]
def out(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as e:
        return f"({e})"
line = {"bench": "env", "device": dev, "cores": os.cpu_count(),
        "gpu": out(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]),
        "lmd": out([lmd, "bench", "--version"]),
        "missing_libraries": [l.split()[0] for l in out(["ldd", lmd]).splitlines() if "not found" in l]}
try:
    import torch
    line["torch"] = torch.__version__
    line["torch_cuda"] = torch.cuda.is_available()
except Exception as e:
    line["torch"] = f"({e})"
print(json.dumps(line))
EOF

  step parity-f32 120 "$lmd" bench parity --shared "$data" --device "$dev" --precision f32
  [ "$small" = 1 ] || step parity-bf16 120 "$lmd" bench parity --shared "$data" --device "$dev" --precision bf16
  # the row kernels (LMD_KERNELS=rows: LayerNorm, softmax, GELU one CUDA kernel each way) on the GPU
  # for the first time: the same vectors and tolerances
  step parity-rows 90 env LMD_KERNELS=rows "$lmd" bench parity --shared "$data" --device "$dev" --precision f32

  local tw="$data/weights/taesd"
  # NCCL (the binary has --features nccl): the gradient buckets beside ncclAllReduce on one
  # device buffer, at one rank (this machine has one GPU); the averaged ones must stay ones
  [ "${dev%%:*}" = cuda ] && step allreduce-nccl 60 "$lmd" bench allreduce --device "$dev" \
    --sizes 1048576 16777216 --iters 20
  step vae-taesd 60 "$lmd" bench vae --vae taesd --vae-weights "$tw" --device "$dev" --precision "$prec" \
    --batch "$bvae" --size "$vsize" --seconds "$vsec"
  step vae-taesd-torch 90 "$py" tools/torch_vae_encode.py --vae taesd --weights "$tw" --device "$dev" \
    --precision "$torch_prec" --batch "$bvae" --size "$vsize" --seconds "$vsec" \
    --check "$data/testvectors/taesd_imagenette_val16.safetensors"
  step vae-sdvae 90 "$lmd" bench vae --vae sd-vae --vae-weights random --device "$dev" --precision "$prec" \
    --batch "$bsd" --size "$vsize" --seconds "$vsec"
  step vae-sdvae-torch 90 "$py" tools/torch_vae_encode.py --vae sd-vae --weights random --device "$dev" \
    --precision "$torch_prec" --batch "$bsd" --size "$vsize" --seconds "$vsec"

  step train-step 150 "$lmd" bench train-step --preset "$preset" --device "$dev" --precision "$prec" \
    --ratios 0.15,0.75 --batch "$bstep" --steps "$nstep" --torch-anchor tools/torch_mae_train_step.py
  # the same step with the row kernels, beside candle's ops in the same invocation:
  # train_step_rows_vs_candle_<ratio> > 1 says make them the GPU's default (Backend::resolve)
  step train-step-rows 120 env LMD_KERNELS=rows "$lmd" bench train-step --preset "$preset" --device "$dev" \
    --precision "$prec" --ratios 0.15,0.75 --batch "$bstep" --steps "$nstep" --baseline-kernels candle
  # the same sizes for PyTorch with SDPA, then compiled (the preset's sizes, as lmd-bench passes them)
  local sizes=(--batch "$bstep" --steps "$nstep" --ratios 0.15,0.75 --device "$dev" --precision "$torch_prec")
  if [ "$preset" = base_patch4 ]; then
    sizes+=(--chans 4 --size 28 --patch 4 --dim 768 --depth 12 --heads 12 --ddim 512 --ddepth 8 --dheads 16)
  fi
  step train-step-torch-sdpa 120 "$py" tools/torch_mae_train_step.py "${sizes[@]}" --sdpa
  [ "$small" = 1 ] || step train-step-torch-compile 180 "$py" tools/torch_mae_train_step.py "${sizes[@]}" --sdpa --compile
  # the AdamW step of the same model, flat beside per parameter (bf16 in the small run too:
  # on the CPU in f32 the trainer updates in place, which this does not time)
  step optimizer 60 "$lmd" bench optimizer --preset "$preset" --device "$dev" --precision bf16 \
    --steps "$ostep" --rounds 3

  # precompute at scale: the imagenette and ILSVRC sample images, repeated with new keys
  step make-input 120 "$py" - "$data" "$W/rep" "$copies" <<'EOF'
import csv, io, json, os, sys, tarfile
data, out, copies = sys.argv[1], sys.argv[2], int(sys.argv[3])
os.makedirs(out, exist_ok=True)
samples = []  # (key, jpeg bytes, class index)
with tarfile.open(f"{data}/data/imagenette/imagenette-train-000000.tar") as t:
    files = {m.name: t.extractfile(m).read() for m in t if m.isfile()}
for name, b in sorted(files.items()):
    if name.endswith(".jpg"):
        k = name[:-4]
        samples.append((k, b, int(files[k + ".cls"].decode().strip())))
sy = [l.split()[0] for l in open(f"{data}/data/imagenet-samples/LOC_synset_mapping.txt")]
lab = {r["ImageId"]: sy.index(r["PredictionString"].split()[0])
       for r in csv.DictReader(open(f"{data}/data/imagenet-samples/LOC_val_solution.csv"))}
with tarfile.open(f"{data}/data/imagenet-samples/ILSVRC-sample_img_val.tar") as t:
    for m in t:
        k = os.path.basename(m.name).rsplit(".", 1)[0]
        if m.isfile() and k in lab:
            samples.append((k, t.extractfile(m).read(), lab[k]))
def add(t, name, b):
    i = tarfile.TarInfo(name); i.size = len(b); t.addfile(i, io.BytesIO(b))
for c in range(copies):
    with tarfile.open(f"{out}/rep-{c:03d}.tar", "w") as t:
        for k, b, y in samples:
            add(t, f"c{c:03d}_{k}.jpg", b); add(t, f"c{c:03d}_{k}.cls", str(y).encode())
print(json.dumps({"bench": "make-input", "images": copies * len(samples), "tars": copies,
                  "per_copy": len(samples)}))
EOF
  local last=$((copies - 1)) reps
  reps="$W/rep/rep-{000..$(printf %03d "$last")}.tar"
  step decode-only 120 "$lmd" bench decode --input "$reps" --threads "$cores" --size "$psize" --repeat 1
  step precompute 240 "$lmd" precompute --input "$reps" --output "$W/lat-rep" --device "$dev" \
    --vae-weights "$tw" --vae-precision "$prec" --size "$psize" --batch-size 128 \
    --decode-threads "$cores" --records-per-shard 5000 --no-progress
  [ -f "$W/lat-rep/summary.json" ] && "$py" -c 'import json,sys; s=json.load(open(sys.argv[1])); s["bench"]="precompute"; print(json.dumps(s))' \
    "$W/lat-rep/summary.json" >>"$J"

  # a short pretrain, then fine-tune, on the GPU
  local nette="$data/data/imagenette"
  step precompute-nette 120 "$lmd" precompute --input "$nette/imagenette-train-{000000..000001}.tar" \
    --output "$W/lat-train" --device "$dev" --vae-weights "$tw" --vae-precision "$prec" --size 224 \
    --decode-threads "$cores" --limit "$limit" --no-progress
  step precompute-nette-val 120 "$lmd" precompute --input "$nette/imagenette-val-000000.tar" \
    --output "$W/lat-val" --device "$dev" --vae-weights "$tw" --vae-precision "$prec" --size 224 \
    --decode-threads "$cores" --limit "$vlimit" --no-progress
  # steps for about pretrain_s seconds at the train-step rate measured above (ratio 0.15: the slower)
  local rate steps
  rate=$(grep -h '"bench": *"train-step"' "$J" | grep -v baseline | "$py" -c 'import json,sys; v=[json.loads(l)["samples_per_s"] for l in sys.stdin]; print(min(v) if v else 0)' 2>/dev/null)
  steps=$("$py" -c "import sys; print(max($minsteps, int(float('${rate:-0}') * $pretrain_s / $bstep)))")
  local pargs=(--preset "$preset" --device "$dev" --precision "$prec" --batch-size "$bstep" --no-progress)
  [ "$small" = 1 ] && pargs=(--preset "$preset" --device "$dev" --batch-size 8 --no-progress)
  step pretrain 240 "$lmd" train --data "$W/lat-train" --out "$W/run" --steps "$steps" \
    --checkpoint-every "$steps" --log-every 10 "${pargs[@]}"
  local ckpt; ckpt="$W/run/checkpoints/$(cat "$W/run/checkpoints/latest" 2>/dev/null)/model.safetensors"
  step finetune 240 "$lmd" finetune --pretrained "$ckpt" --data "$W/lat-train" --val-data "$W/lat-val" \
    --out "$W/ft" --epochs "$ft_epochs" "${pargs[@]}"
  ( "$py" - "$W" "$J" <<'EOF'
import json, sys
w, j = sys.argv[1], sys.argv[2]
def lines(p):
    try:
        return [json.loads(l) for l in open(p) if l.strip()]
    except OSError:
        return []
m, ev = lines(f"{w}/run/metrics.jsonl"), lines(f"{w}/ft/eval.jsonl")
r = lines(j)
def get(pred, key):
    v = [x.get(key) for x in r if pred(x) and x.get(key) is not None]
    return v[-1] if v else None
s = {"bench": "summary",
     "pretrain_steps": m[-1]["step"] if m else None, "pretrain_loss_first": m[0]["loss"] if m else None,
     "pretrain_loss_last": m[-1]["loss"] if m else None,
     "finetune_top1": [e.get("top1") for e in ev]}
steps = [x for x in r if x.get("bench") == "train-step" and "baseline" not in x]
ours = {x["mask_ratio"]: x["samples_per_s"] for x in steps if not x.get("backend", "").startswith("rows")}
for x in steps:
    if x.get("backend", "").startswith("rows") and "vs_baseline" in x:
        s[f"train_step_rows_vs_candle_{x['mask_ratio']}"] = x["vs_baseline"]
for x in steps:
    if "host_fraction" in x:
        # near 1: the step was bound by launching ops on the host, not by the GPU
        tag = "rows_" if x.get("backend", "").startswith("rows") else ""
        s[f"train_step_{tag}host_fraction_{x['mask_ratio']}"] = x["host_fraction"]
for x in r:
    if x.get("baseline") == "pytorch" and "mask_ratio" in x and "vae" not in x:
        tag = ("compile" if x.get("compile") else x.get("attention", "explicit"))
        if x["mask_ratio"] in ours:
            s[f"train_step_vs_torch_{tag}_{x['mask_ratio']}"] = ours[x["mask_ratio"]] / x["samples_per_s"]
for v in ("taesd", "sd-vae"):
    a = get(lambda x: x.get("bench") == "vae" and x.get("vae") == v, "encode_images_per_s")
    b = get(lambda x: x.get("baseline") == "pytorch" and x.get("vae") == v, "encode_images_per_s")
    if a and b:
        s[f"{v}_encode_vs_torch"] = a / b
d = get(lambda x: x.get("bench") == "decode" and x.get("output", "chw-u8") == "chw-u8", "images_per_s")
p = get(lambda x: x.get("bench") == "precompute", "images_per_s")
if d and p:
    s["precompute_vs_decode_only"] = p / d
    s["precompute_images_per_s"] = p
    s["projected_imagenet_train_min"] = 1281167 / p / 60
a = get(lambda x: x.get("bench") == "allreduce" and x.get("elems") == 16777216, "buckets_vs_nccl")
if a:
    s["nccl_buckets_vs_raw_16m"] = a
o = get(lambda x: x.get("bench") == "optimizer" and "summary" in x, "per_param_over_flat")
if o:
    s["optimizer_per_param_over_flat"] = o
s["failed_steps"] = [x["step"] for x in r if "step" in x and x.get("rc")]
s["skipped_steps"] = [x["step"] for x in r if "step" in x and "skipped" in x]
print(json.dumps(s))
EOF
  ) >>"$J"
  tail -1 "$J"
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) echo "usage: scripts/device-check.sh prepare | run   (see the header)" >&2; exit 2 ;;
esac
