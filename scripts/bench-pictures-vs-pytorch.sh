#!/usr/bin/env bash
# Seconds per picture at 512x512 on SD 1.5 shapes (random weights), ours and PyTorch +
# diffusers back to back, row by row: DPM++ 2M 20 steps CFG 7.5, LCM-LoRA 4 steps,
# 1-step Euler a trailing, each with the VAE and with TAESD (docs/performance.md).
#
#   scripts/bench-pictures-vs-pytorch.sh /tmp/ref/bin/python /tmp/sd15-random /tmp/spp
#
# The first argument is a Python with torch, diffusers and peft; the second a folder
# made by ../shared/bench/make_sd15_random.py (with --tokenizer-dir); the third a work
# folder (TAESD and LoRA with random weights are made there once).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?python with torch, diffusers and peft}
MODEL=${2:?folder from make_sd15_random.py}
WORK=${3:?work folder}
mkdir -p "$WORK"
cargo build --release --example bench
"$PY" scripts/seconds_per_picture.py "$MODEL" "$WORK" --json /dev/null --only inputs
OUT="$WORK/pictures.jsonl"
: > "$OUT"
ours() {
  RAYON_NUM_THREADS=2 target/release/examples/bench --model "$MODEL" --component picture \
    --runs 1 --warmup 1 --json "$@" | python3 -c "import json,sys; d=json.loads(sys.stdin.readline()); print(json.dumps({'row': '$ROW', 'side': 'ours', 'seconds': d['median_s'], 'load_s': d['load_s'], 'peak_rss_mb': d['peak_rss_mb']}))" | tee -a "$OUT"
}
TRAILING="$WORK/euler_a_trailing.json"
python3 - "$MODEL/scheduler/scheduler_config.json" "$TRAILING" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c.update({"_class_name": "EulerAncestralDiscreteScheduler", "timestep_spacing": "trailing"})
json.dump(c, open(sys.argv[2], "w"))
PY
for ROW in dpmpp20 dpmpp20_tiny lcm4 lcm4_tiny turbo1 turbo1_tiny; do
  "$PY" scripts/seconds_per_picture.py "$MODEL" "$WORK" --threads 2 --json "$OUT" --only "$ROW" >/dev/null
  tail -n 1 "$OUT"
  tiny=()
  [[ $ROW == *_tiny ]] && tiny=(--tiny-vae "$WORK/taesd-random" --tiny-decoder)
  case $ROW in
    dpmpp20*) ours --scheduler dpmpp-2m --steps 20 --guidance 7.5 "${tiny[@]}" ;;
    lcm4*) ours --scheduler lcm --steps 4 --guidance 1 --lora "$WORK/lcm-lora-random.safetensors" "${tiny[@]}" ;;
    turbo1*) ours --scheduler-config "$TRAILING" --steps 1 --guidance 1 "${tiny[@]}" ;;
  esac
done
