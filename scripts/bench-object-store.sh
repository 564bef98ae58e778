#!/usr/bin/env bash
# Object storage against local files, A/B in one invocation, alternating, on moto_server over
# loopback (pip install 'moto[server]'): a real S3 implementation, so this measures our client
# path (HTTP, signing, streaming, uploads), not a network. One JSON line per round:
# - precompute: the same 4 imagenette tars (2000 images, 64 px, TAESD), local -> local beside
#   s3 -> s3 (images/s from each run's summary.json) and their ratio;
# - loader: `lmd-bench loader` on the resulting latents, local beside s3:// with a cold cache
#   (open_s: the fetch into the cache) and a warm one (samples/s of the loader after opening).
# Needs BIN (target/debug or target/release with lmd-precompute and lmd-bench) and LMD_SHARED.
set -euo pipefail
BIN="$(cd "${BIN:-target/debug}" && pwd)"
SHARED="$(cd "${LMD_SHARED:-../shared}" && pwd)"
ROUNDS="${ROUNDS:-3}"
work="$(mktemp -d)"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
moto_server -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
moto=$!
trap 'kill $moto 2>/dev/null; rm -rf "$work"' EXIT
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
export AWS_ENDPOINT_URL="http://127.0.0.1:$port"
for _ in $(seq 50); do curl -s -o /dev/null "$AWS_ENDPOINT_URL" && break; sleep 0.2; done
cd "$work"
mkdir tars
for i in 0 1 2 3; do ln -s "$SHARED/data/imagenette/imagenette-train-00000$i.tar" "tars/part-$i.tar"; done
# upload with a client library (boto3 comes with moto; curl --data-binary stores empty objects)
s3() { python3 - "$@" <<'P'
import boto3, os, sys
c = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
op = sys.argv[1]
if op == "bucket": c.create_bucket(Bucket="bench")
if op == "put": c.upload_file(sys.argv[2], "bench", sys.argv[3])
if op == "get": c.download_file("bench", sys.argv[2], sys.argv[3])
if op == "rm":
    for o in c.list_objects_v2(Bucket="bench", Prefix=sys.argv[2]).get("Contents", []):
        c.delete_object(Bucket="bench", Key=o["Key"])
P
}
s3 bucket
for i in 0 1 2 3; do s3 put "tars/part-$i.tar" "in/part-$i.tar"; done
pre() { "$BIN/lmd-precompute" --input "$1" --output "$2" --vae-weights "$SHARED/weights/taesd" \
  --size 64 --batch-size 16 --records-per-shard 500 --no-progress --staging-dir "$work/staging" 2>/dev/null; }
rate() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['images_per_s'])" "$1"; }
for r in $(seq 1 "$ROUNDS"); do
  rm -rf local; s3 rm lat/
  pre "tars/part-*.tar" local; a=$(rate local/summary.json)
  pre "s3://bench/in/part-{0..3}.tar" s3://bench/lat
  s3 get lat/summary.json summary-s3.json; b=$(rate summary-s3.json)
  loc=$("$BIN/lmd-bench" loader --data local --seconds 3 | sed -n 1p)
  rm -rf cache
  cold=$(LMD_CACHE_DIR="$work/cache" "$BIN/lmd-bench" loader --data s3://bench/lat --seconds 3 | sed -n 1p)
  warm=$(LMD_CACHE_DIR="$work/cache" "$BIN/lmd-bench" loader --data s3://bench/lat --seconds 3 | sed -n 1p)
  python3 - "$r" "$a" "$b" "$loc" "$cold" "$warm" <<'P'
import json, sys
r, a, b = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
loc, cold, warm = (json.loads(x) for x in sys.argv[4:7])
print(json.dumps({"bench": "object-store", "round": r,
  "precompute_local_images_per_s": round(a, 1), "precompute_s3_images_per_s": round(b, 1),
  "precompute_ratio_s3_vs_local": round(b / a, 3),
  "loader_local_samples_per_s": round(loc["samples_per_s"]), "loader_s3_warm_samples_per_s": round(warm["samples_per_s"]),
  "loader_ratio_warm_vs_local": round(warm["samples_per_s"] / loc["samples_per_s"], 3),
  "open_local_s": round(loc["open_s"], 3), "open_s3_cold_s": round(cold["open_s"], 3), "open_s3_warm_s": round(warm["open_s"], 3)}))
P
done
