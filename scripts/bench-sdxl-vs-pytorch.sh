#!/usr/bin/env bash
# SDXL base 1.0 shapes (random weights) back to back: PyTorch + diffusers, then ours;
# then one 1024x1024 picture end to end through our pipeline (2 steps), with its peak
# memory. docs/performance.md records the figures.
#
#   scripts/bench-sdxl-vs-pytorch.sh /tmp/ref/bin/python /tmp/sdxl-random
#
# The folder is made by `python scripts/sdxl_random.py build DIR` (fp16 weights).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?python with torch and diffusers}
MODEL=${2:?folder from scripts/sdxl_random.py build}
cargo build --release --example bench
"$PY" scripts/sdxl_random.py time "$MODEL" --json /tmp/sdxl-torch.json --threads 2 --runs 1
for c in text_encoder unet vae; do
  RAYON_NUM_THREADS=2 target/release/examples/bench --model "$MODEL" --component "$c" \
    --height 1024 --width 1024 --runs 1 --json
done
RAYON_NUM_THREADS=2 target/release/examples/bench --model "$MODEL" --component picture \
  --height 1024 --width 1024 --steps 2 --guidance 5 --runs 1 --warmup 0 --json
