# Source this once in a shell, on a machine that cannot reach github.com:
#
#     source scripts/cuda-offline-setup.sh
#     cargo build --release --features cuda --example txt2img
#
# burn's CUDA backend (burn-cuda 0.22 -> cubecl-cuda -> cubecl-llvm) links LLVM
# through `tracel-llvm-bundler`, whose build script downloads an LLVM bundle from
# GitHub unless its install marker exists:
#     ${XDG_DATA_HOME:-~/.local/share}/tracel/tracel-llvm-<version>/.tracel-llvm-installed
# and then only runs that folder's `bin/llvm-config`. This script installs
# Debian's LLVM 22 (llvm-22-dev, libpolly-22-dev, libzstd-dev: the static libraries
# `llvm-config --link-static --libs` names) from the Debian mirror, puts an
# `llvm-config` wrapper in that folder and writes the marker. No CUDA toolkit is
# needed to build (cudarc loads the driver at run time); running needs an NVIDIA
# driver, and binaries linked this way load libz3, libxml2 and libzstd (installed
# with LLVM here; on another machine: Debian's libz3-4, libxml2, libzstd1). With network access none of this is needed: `--features cuda` downloads
# the bundle by itself.
#
# Environment: SD_LLVM_MAJOR (default 22), SD_TRACEL_LLVM_VERSION (default: from
# Cargo.lock, else the tracel-llvm-bundler crate in ~/.cargo/registry, else 23.1.0-4).
# Safe to source under `set -euo pipefail` (as .ci/run does).

_sd_cuda_setup() {
    local major="${SD_LLVM_MAJOR:-22}"
    local llvm_config="/usr/lib/llvm-${major}/bin/llvm-config"
    if [ ! -x "$llvm_config" ]; then
        if ! command -v apt-get >/dev/null 2>&1; then
            echo "cuda-offline-setup: no $llvm_config and no apt-get; install LLVM ${major} (static libraries) first" >&2
            return 1
        fi
        local sudo=""
        [ "$(id -u)" -ne 0 ] && sudo="sudo"
        echo "cuda-offline-setup: installing llvm-${major}-dev, libpolly-${major}-dev, libzstd-dev" >&2
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
            "llvm-${major}-dev" "libpolly-${major}-dev" libzstd-dev >/dev/null || {
            $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
                "llvm-${major}-dev" "libpolly-${major}-dev" libzstd-dev >/dev/null
        } || { echo "cuda-offline-setup: apt-get install failed" >&2; return 1; }
    fi
    # The bundler's version: from Cargo.lock when run in the repository, else the
    # newest in the cargo registry, else the one burn 0.22.1 locks.
    local version="${SD_TRACEL_LLVM_VERSION:-}"
    if [ -z "$version" ] && [ -f Cargo.lock ]; then
        version=$(grep -A1 '^name = "tracel-llvm-bundler"$' Cargo.lock 2>/dev/null \
            | sed -n 's/^version = "\(.*\)"$/\1/p' | head -n 1 || true)
    fi
    if [ -z "$version" ]; then
        local crate
        crate=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/tracel-llvm-bundler-* 2>/dev/null \
            | sort -V | tail -n 1 || true)
        version="${crate##*/tracel-llvm-bundler-}"
    fi
    [ -n "$version" ] || version="23.1.0-4"
    local dir="${XDG_DATA_HOME:-$HOME/.local/share}/tracel/tracel-llvm-${version}"
    mkdir -p "$dir/bin" || return 1
    # Debian's llvm-config names some system libraries by path
    # (/usr/lib/x86_64-linux-gnu/libz3.so), which the bundler would turn into
    # `-llibz3`: the wrapper rewrites such paths as `-lz3`.
    cat > "$dir/bin/llvm-config.new" <<WRAPPER
#!/bin/sh
# Debian's LLVM ${major} standing in for tracel's LLVM bundle (scripts/cuda-offline-setup.sh).
out=\$("$llvm_config" "\$@") || exit \$?
printf '%s\\n' "\$out" | tr ' ' '\\n' \\
    | sed -E 's#^/.*/lib([^/]+)\\.(so|a)(\\.[0-9.]+)?\$#-l\\1#' | paste -sd ' ' -
WRAPPER
    # Replace the wrapper and create the marker only when they change: the bundler's
    # build script reruns when the marker's mtime moves, and with it cubecl-llvm and
    # every crate above (burn, ours), so sourcing this again must leave them alone.
    if cmp -s "$dir/bin/llvm-config.new" "$dir/bin/llvm-config"; then
        rm -f "$dir/bin/llvm-config.new"
    else
        chmod +x "$dir/bin/llvm-config.new" && mv -f "$dir/bin/llvm-config.new" "$dir/bin/llvm-config"
    fi
    [ -e "$dir/.tracel-llvm-installed" ] || touch "$dir/.tracel-llvm-installed"
    echo "cuda-offline-setup: LLVM $("$dir/bin/llvm-config" --version) stands in for tracel-llvm ${version} ($dir)" >&2
}

_sd_cuda_setup
