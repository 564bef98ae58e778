#!/usr/bin/env bash
# Data parallel on one machine, A/B in one invocation, alternating: 1 process x 2 threads
# (batch 64) against `mpirun -np 2` x 1 thread each (batch 32 per rank: the same global batch),
# same data, model and steps. One JSON line per round: samples/s of both (the last two logged
# intervals, global over the ranks), their ratio, and the 2-rank run's comm_fraction.
# Needs a build with --features mpi (BIN=target/debug or target/release) and LMD_SHARED.
set -euo pipefail
BIN="$(cd "${BIN:-target/debug}" && pwd)"
SHARED="$(cd "${LMD_SHARED:-../shared}" && pwd)"
ROUNDS="${ROUNDS:-3}"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
cd "$work"
"$BIN/lmd-precompute" --input "$SHARED/data/imagenette/imagenette-train-000000.tar" \
  --vae-weights "$SHARED/weights/taesd" --size 64 --output data --limit 640 --no-progress 2>/dev/null
cat > cfg.toml <<'C'
steps = 40
blr = 1.5e-4
warmup_steps = 5
checkpoint_every = 1000
log_every = 10
window = 1024
preview_samples = 0
[model]
in_chans = 4
img_size = [8, 8]
patch_size = 1
embed_dim = 192
depth = 6
num_heads = 3
decoder_embed_dim = 128
decoder_depth = 2
decoder_num_heads = 4
mlp_ratio = 4.0
norm_pix_loss = true
C
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
tail_rate() { tail -2 "$1/metrics.jsonl" | python3 -c "import sys,json; L=[json.loads(l) for l in sys.stdin]; print(sum(x['$2'] for x in L)/len(L))"; }
for i in $(seq 1 "$ROUNDS"); do
  rm -rf one two
  RAYON_NUM_THREADS=2 "$BIN/lmd-train" --config cfg.toml --data data --out one --batch-size 64 --no-progress 2>/dev/null
  RAYON_NUM_THREADS=1 mpirun -np 2 --bind-to none -x RAYON_NUM_THREADS "$BIN/lmd-train" \
    --config cfg.toml --data data --out two --batch-size 32 --no-progress 2>/dev/null
  a=$(tail_rate one samples_per_s); b=$(tail_rate two samples_per_s); c=$(tail_rate two comm_fraction)
  python3 -c "import json; print(json.dumps({'bench':'ddp','round':$i,'one_process_2_threads_samples_per_s':round($a,1),'two_ranks_1_thread_samples_per_s':round($b,1),'ratio':round($b/$a,3),'two_ranks_comm_fraction':round($c,4)}))"
done
