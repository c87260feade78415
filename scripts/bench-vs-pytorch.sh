#!/usr/bin/env bash
# Times SD 1.5 components back to back: PyTorch + diffusers (../shared/bench), then
# ours (the bench example), same shapes, f32, 2 threads. Prints both and the ratios.
#
#   scripts/bench-vs-pytorch.sh /tmp/ref/bin/python /tmp/sd15-random
#
# The first argument is a Python with torch + diffusers; the second a random-weight
# SD 1.5 folder made by ../shared/bench/make_sd15_random.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?python with torch and diffusers}
MODEL=${2:?folder from make_sd15_random.py}
cargo build --release --example bench
"$PY" ../shared/bench/make_sd15_random.py "$MODEL" --time-only --timings /tmp/torch-timings.json --threads 2 >/dev/null
: > /tmp/ours.jsonl
for c in text_encoder unet vae; do
  RAYON_NUM_THREADS=2 target/release/examples/bench --config tests/fixtures/configs/sd15 \
    --component "$c" --runs 3 --json | tee -a /tmp/ours.jsonl
done
python3 - <<'PY'
import json
torch = json.load(open("/tmp/torch-timings.json"))
flat = {}
def walk(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and "median_s" in v:
            flat[prefix + k] = v["median_s"]
        elif isinstance(v, dict):
            walk(v, prefix + k + ".")
walk(torch)
ours = {json.loads(l)["component"]: json.loads(l) for l in open("/tmp/ours.jsonl")}
print(f"{'component':<14}{'ours s':>9}{'torch s':>9}{'ratio':>7}{'peak RSS MB':>13}")
for comp, key in [("text_encoder", "text"), ("unet", "unet"), ("vae", "vae")]:
    t = next((v for k, v in flat.items() if key in k), None)
    o = ours[comp]
    ratio = f"{o['median_s'] / t:.2f}x" if t else "?"
    print(f"{comp:<14}{o['median_s']:9.3f}{(t or float('nan')):9.3f}{ratio:>7}{o['peak_rss_mb']:13.0f}")
PY
