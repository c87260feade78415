#!/usr/bin/env bash
# GPU readiness check: parity of the tiny fixtures and SD 1.5 speed on wgpu over the
# NVIDIA Vulkan driver, on a machine with no network and no Rust toolchain.
#
#   scripts/gpu-check.sh build   # here, with cargo: stripped release binaries + libvulkan
#                                # into target/gpu-check/ (carry that folder over)
#   scripts/gpu-check.sh run     # there, from the repository root: prints a table last
#
# `run` builds the SD 1.5 models from tests/fixtures/configs/sd15 with random weights
# (no weight files travel), times the U-Net (batch 2 = CFG, f16 and f32), the VAE
# decode and the 20-step 512x512 f16 pipeline, and samples the GPU memory with
# nvidia-smi. It must finish in under 8 minutes; each stage has its own timeout.
# BIN_DIR overrides where the binaries are (a folder with `bench` and `suite`, e.g. links
# to target/debug builds for a dry run on lavapipe: there the parity stage passes and
# the SD 1.5 stages time out or hit lavapipe's 128 MiB buffer limit, as expected).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=target/gpu-check

build() {
  cargo build --release --features wgpu --example bench
  cargo test --release --features wgpu --test suite --no-run
  rm -rf "$OUT_DIR" && mkdir -p "$OUT_DIR/lib"
  cp target/release/examples/bench "$OUT_DIR/bench"
  local suite
  suite=$(ls -t target/release/deps/suite-* | grep -v '\.d$' | head -1)
  cp "$suite" "$OUT_DIR/suite"
  strip "$OUT_DIR/bench" "$OUT_DIR/suite"
  # The Vulkan loader, for a GPU machine whose image lacks it (the driver's ICD is
  # part of the NVIDIA driver itself).
  for lib in /usr/lib/x86_64-linux-gnu/libvulkan.so.1*; do
    [ -e "$lib" ] && cp -L "$lib" "$OUT_DIR/lib/" && break
  done
  ls -la "$OUT_DIR" "$OUT_DIR/lib"
  du -sh "$OUT_DIR"
}

# Makes wgpu find the NVIDIA driver through Vulkan.
setup_vulkan() {
  if ! ldconfig -p 2>/dev/null | grep -q 'libvulkan.so.1'; then
    export LD_LIBRARY_PATH="$BIN_DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
  local icd=""
  for f in /usr/share/vulkan/icd.d/nvidia_icd*.json /etc/vulkan/icd.d/nvidia_icd*.json; do
    [ -e "$f" ] && icd="$f" && break
  done
  if [ -z "$icd" ] && ldconfig -p 2>/dev/null | grep -q 'libGLX_nvidia.so.0'; then
    # Container images often carry the driver libraries but not the ICD manifest.
    icd=/tmp/nvidia_icd.json
    cat > "$icd" <<'JSON'
{ "file_format_version": "1.0.0",
  "ICD": { "library_path": "libGLX_nvidia.so.0", "api_version": "1.3" } }
JSON
  fi
  if [ -n "$icd" ]; then
    export VK_ICD_FILENAMES="$icd" VK_DRIVER_FILES="$icd"
  fi
  export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp/xdg-runtime}"
  mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
  echo "== Vulkan ICD: ${icd:-system default}"
}

# Samples the GPU memory in use every 0.2 s into $1 (MiB), until killed.
sample_gpu_memory() {
  while true; do
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1 >> "$1" || true
    sleep 0.2
  done
}

run() {
  BIN_DIR="$(cd "${BIN_DIR:-$OUT_DIR}" && pwd)"
  setup_vulkan
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  local cfg=tests/fixtures/configs/sd15 results=/tmp/gpu-check.jsonl mem=/tmp/gpu-check-mem.txt
  : > "$results"; : > "$mem"
  local baseline
  baseline=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -1 || echo 0)

  echo "== parity of the tiny fixtures on wgpu (and flex)"
  local parity="failed"
  if SD_FIXTURES="$PWD/tests/fixtures" timeout 240 "$BIN_DIR/suite" models:: --test-threads 1; then
    parity="passed"
  fi

  sample_gpu_memory "$mem" &
  SAMPLER=$!
  trap 'kill "${SAMPLER:-}" 2>/dev/null || true' EXIT
  bench() { timeout "$1" "$BIN_DIR/bench" --config "$cfg" --device wgpu --json "${@:2}" | tee -a "$results" || echo "bench $* failed or timed out"; }
  echo "== SD 1.5 512x512 on wgpu"
  bench 90 --component unet --f16 --runs 20
  bench 90 --component unet --runs 10
  bench 60 --component vae --runs 5
  bench 120 --component pipeline --f16 --steps 20 --runs 3
  kill "$SAMPLER" 2>/dev/null || true

  local peak
  peak=$(sort -n "$mem" | tail -1)
  echo
  echo "== gpu-check summary"
  echo "parity (tiny fixtures, models::): $parity"
  python3 - "$results" "${peak:-0}" "${baseline:-0}" <<'PY' || cat "$results"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(f"{'component':<12} {'dtype':<5} {'median s':>9} {'min s':>8} {'it/s':>7}")
for r in rows:
    its = f"{1 / r['median_s']:.1f}" if r["component"] == "unet" else ""
    print(f"{r['component']:<12} {r['dtype']:<5} {r['median_s']:9.4f} {r['min_s']:8.4f} {its:>7}")
peak, base = float(sys.argv[2] or 0), float(sys.argv[3] or 0)
print(f"peak GPU memory used: {peak:.0f} MiB (of which {base:.0f} MiB before the run)")
PY
}

case "${1:-}" in
  build) build ;;
  run) run ;;
  *) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
