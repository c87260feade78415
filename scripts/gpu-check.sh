#!/usr/bin/env bash
# One device run: parity of the tiny fixtures on CUDA and on wgpu (Vulkan), then
# SD 1.5 and SDXL pictures at 512x512 and 1024x1024, 20 steps, U-Net in f16, with
# it/s, seconds per picture, load time and peak GPU memory as one table, on a GPU
# machine with no network and no Rust toolchain.
#
#   scripts/gpu-check.sh build      # here, with cargo: stripped release binaries with
#                                   # wgpu + cuda (offline LLVM) and the libraries they
#                                   # load, packed as target/gpu-check.tar.xz (< 64 MiB)
#   scripts/gpu-check.sh unpack     # there: target/gpu-check.tar.xz -> target/gpu-check/
#                                   # (tar + xz, or Python's lzma where xz is missing)
#   scripts/gpu-check.sh run        # there, from the repository root: prints the table
#   scripts/gpu-check.sh rehearse   # here: `run` on lavapipe with the tiny fixtures
#
# On the device tool: carry ["target/gpu-check.tar.xz"] and run
#   scripts/gpu-check.sh unpack && scripts/gpu-check.sh run
#
# `run` writes random-weight diffusers folders from tests/fixtures/configs/{sd15,sdxl}
# (f16, on the CPU: no weights travel), loads them through the owning pipeline and
# times whole pictures; the U-Net step rate comes from the pictures (steps / (picture
# time - one-step picture time)). Every stage has its own timeout, cut to what is left
# of a whole-run budget (BUDGET, default 540 s) so the run ends, table printed, in
# under 10 minutes whatever hangs. Environment: BIN_DIR (default target/gpu-check), DEVICES
# (default "cuda wgpu"), MODELS (default "sd15 sdxl"), SIZES (default "512 1024"),
# STEPS (default 20), WORK (scratch folder, default /tmp/gpu-check), PARITY_FILTER
# (default "models:: sdxl::sdxl_ depth::depth_anything"), PARITY_TIMEOUT / PICTURE_TIMEOUT (seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=target/gpu-check

build() {
  # shellcheck source=/dev/null
  source scripts/cuda-offline-setup.sh
  local profile="${PROFILE:-release}" dir
  [ "$profile" = release ] && dir=release || dir=debug
  local flag=()
  [ "$profile" = release ] && flag=(--release)
  cargo build "${flag[@]}" --features wgpu,cuda --example bench
  cargo test "${flag[@]}" --features wgpu,cuda --test suite --no-run
  rm -rf "$OUT_DIR" && mkdir -p "$OUT_DIR/lib"
  cp "target/$dir/examples/bench" "$OUT_DIR/bench"
  local suite
  suite=$(ls -t "target/$dir"/deps/suite-* | grep -v '\.d$' | head -1)
  cp "$suite" "$OUT_DIR/suite"
  strip "$OUT_DIR/bench" "$OUT_DIR/suite"
  # The libraries the binaries load that a bare GPU image may lack: the Vulkan loader
  # and what Debian's LLVM links (libz3, libxml2, libzstd, ...). The NVIDIA driver
  # (libcuda, the Vulkan ICD) is the machine's own.
  ldd "$OUT_DIR/bench" "$OUT_DIR/suite" | awk '/=> \//{print $3}' | sort -u |
    grep -v -E '/(libc|libm|libdl|libpthread|librt|libgcc_s|ld-linux[^/]*)\.so' |
    while read -r lib; do cp -L "$lib" "$OUT_DIR/lib/"; done
  for lib in /usr/lib/x86_64-linux-gnu/libvulkan.so.1; do
    [ -e "$lib" ] && cp -L "$lib" "$OUT_DIR/lib/"
  done
  # The two binaries share most of their bytes (LLVM, burn, cubecl); a dictionary
  # larger than one binary lets xz find the second in the first: 320 MB of stripped
  # binaries pack to ~40 MiB (gzip: 95 MiB). Decompressing needs ~400 MiB of memory.
  tar -C target -cf - gpu-check | xz -T1 --lzma2=preset=9e,dict=384MiB > target/gpu-check.tar.xz
  ls -la "$OUT_DIR" "$OUT_DIR/lib"
  du -sh "$OUT_DIR" target/gpu-check.tar.xz
  local bytes
  bytes=$(stat -c %s target/gpu-check.tar.xz)
  if [ "$bytes" -gt $((64 * 1024 * 1024)) ]; then
    echo "gpu-check: target/gpu-check.tar.xz is $((bytes / 1048576)) MiB, over 64 MiB" >&2
    return 1
  fi
}

unpack() {
  local archive=target/gpu-check.tar.xz
  [ -e "$archive" ] || { echo "gpu-check: no $archive (carry it)" >&2; return 1; }
  if command -v xz > /dev/null; then
    tar -C target -xJf "$archive"
  else
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' \
      "$archive" target
  fi
  ls -la "$OUT_DIR"
}

# Seconds a stage may take: its own limit, cut to what is left of the run's budget
# (at least 1, so a late stage fails fast instead of overrunning).
stage_timeout() {
  local left=$((DEADLINE - SECONDS))
  [ "$left" -lt 1 ] && left=1
  [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}

# Makes wgpu find the NVIDIA driver through Vulkan.
setup_vulkan() {
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

# The largest sample in $1 since line $2 (MiB), or "-" without nvidia-smi.
peak_since() {
  local v
  v=$(tail -n +"$(($2 + 1))" "$1" | sort -n | tail -1)
  echo "${v:--}"
}

run() {
  local start=$SECONDS
  DEADLINE=$((SECONDS + ${BUDGET:-540}))
  BIN_DIR="$(cd "${BIN_DIR:-$OUT_DIR}" && pwd)"
  export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$BIN_DIR/lib"
  setup_vulkan
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  local work="${WORK:-/tmp/gpu-check}" devices="${DEVICES:-cuda wgpu}"
  local models="${MODELS:-sd15 sdxl}" sizes="${SIZES:-512 1024}" steps="${STEPS:-20}"
  local results="$work/results.jsonl" mem="$work/mem.txt"
  mkdir -p "$work"
  : > "$results"; : > "$mem"

  echo "== parity of the tiny fixtures (models::, sdxl::, depth::) on: flex $devices"
  local dev parity=()
  for dev in $devices; do
    local env=(SD_FIXTURES="$PWD/tests/fixtures" SD_TEST_DEVICES="$dev")
    [ "$dev" = cuda ] && env+=(SD_TEST_CUDA=1)
    # shellcheck disable=SC2086
    if env "${env[@]}" timeout "$(stage_timeout "${PARITY_TIMEOUT:-150}")" "$BIN_DIR/suite" ${PARITY_FILTER:-models:: sdxl::sdxl_ depth::depth_anything} \
        --test-threads 1 > "$work/parity-$dev.log" 2>&1; then
      parity+=("$dev: $(grep -o '[0-9]* passed' "$work/parity-$dev.log" | tail -1)")
    else
      local failures
      failures=$(grep -c -E 'FAILED|panicked' "$work/parity-$dev.log" || true)
      parity+=("$dev: FAILED ($failures failures, or timed out; $work/parity-$dev.log)")
    fi
    echo "   ${parity[-1]}"
  done

  sample_gpu_memory "$mem" &
  SAMPLER=$!
  trap 'kill "${SAMPLER:-}" 2>/dev/null || true' EXIT

  local model
  for model in $models; do
    local cfg="${CONFIG_DIR:-tests/fixtures/configs}/$model" folder="$work/$model"
    if [ ! -e "$folder/unet" ]; then
      echo "== writing random f16 weights for $model"
      timeout "$(stage_timeout 240)" "$BIN_DIR/bench" --config "$cfg" --component write --f16 --out "$folder" \
        --tokenizer-files tests/fixtures/tokenizer || { echo "   writing $model failed"; continue; }
    fi
    for dev in $devices; do
      local mark
      mark=$(wc -l < "$mem")
      echo "== $model on $dev: ${sizes// /, } pixels, one step then $steps steps each (f16 U-Net)"
      timeout "$(stage_timeout "${PICTURE_TIMEOUT:-200}")" "$BIN_DIR/bench" --model "$folder" --component picture \
        --device "$dev" --f16 --sizes "${sizes// /,}" --steps "$steps" --runs 1 --json \
        > "$work/picture-$model-$dev.jsonl" 2> "$work/picture-$model-$dev.log" || true
      grep '^{' "$work/picture-$model-$dev.jsonl" |
        sed "s/^{/{\"model\":\"$model\",\"peak_mib\":\"$(peak_since "$mem" "$mark")\",/" >> "$results" || true
      grep -q '^{' "$work/picture-$model-$dev.jsonl" ||
        echo "{\"model\":\"$model\",\"device\":\"$dev\",\"failed\":true}" >> "$results"
    done
  done
  kill "$SAMPLER" 2>/dev/null || true

  echo
  echo "== gpu-check summary ($((SECONDS - start)) s)"
  printf '%s\n' "${parity[@]/#/parity }"
  python3 - "$results" <<'PY' || cat "$results"
import json, sys
print(f"{'model':<10} {'device':<6} {'size':>9} {'load s':>7} {'s/picture':>10} {'U-Net it/s':>11} {'peak GPU MiB':>13}")
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("failed"):
        print(f"{r['model']:<10} {r['device']:<6}  failed or timed out")
        continue
    per_step = (r["median_s"] - r["one_step_s"]) / (r["steps"] - 1) if r["steps"] > 1 else None
    its = f"{1 / per_step:.2f}" if per_step and per_step > 0 else "-"
    size = f"{r['width']}x{r['height']}"
    print(f"{r['model']:<10} {r['device']:<6} {size:>9} {r['load_s']:7.2f} {r['median_s']:10.3f} {its:>11} {r['peak_mib']:>13}")
PY
}

# `run` on this machine's lavapipe with the tiny fixtures: the whole script end to
# end, at the sizes the tiny models take. lavapipe compiles every autotune candidate
# with LLVM on the CPU (minutes for the VAE tests), so the parity stage here takes the
# text encoder and U-Net cases unless PARITY_FILTER says otherwise.
rehearse() {
  BIN_DIR="${BIN_DIR:-$OUT_DIR}" DEVICES="${DEVICES:-wgpu}" SIZES="${SIZES:-64 128}" \
    PARITY_FILTER="${PARITY_FILTER:-models::text_encoder models::unet_matches}" \
    PARITY_TIMEOUT="${PARITY_TIMEOUT:-900}" PICTURE_TIMEOUT="${PICTURE_TIMEOUT:-900}" \
    CONFIG_DIR="$PWD/tests/fixtures" MODELS="${MODELS:-tiny-sd15 tiny-sdxl}" \
    BUDGET="${BUDGET:-3600}" run
}

case "${1:-}" in
  build) build ;;
  unpack) unpack ;;
  run) run ;;
  rehearse) rehearse ;;
  *) echo "usage: $0 build|unpack|run|rehearse" >&2; exit 2 ;;
esac
