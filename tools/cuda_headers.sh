#!/usr/bin/env bash
# Prints (last line of stdout) a directory D holding D/nccl/include (nccl.h) and D/cublas/include
# (cublas_v2.h), for compiling tpext's CUDA code where the CUDA toolkit ships neither (the CI machine).
#
# The headers come from NVIDIA's own PyPI wheels, pinned to the versions torch 2.11+cu130 depends on
# (nvidia-nccl-cu13 2.28.9; nvidia-cublas 13.1.0.3 via cuda-toolkit 13.0.2), so the code is compiled
# against the same headers it meets at run time. Only the wheels' include/ folders are kept: the
# wheels are ~620 MB, the headers ~1 MB. They are cached under
#   ${TPEXT_CACHE:-$HOME/.cache/tpext}/cuda-headers/nccl-<v>_cublas-<v>/
# so later runs on the same machine never download again. The cache entry appears atomically (built
# in a temporary sibling, then renamed), so an interrupted or concurrent run never leaves a half-filled
# one behind. Headers are architecture-independent: the x86_64 wheels serve any host.
set -euo pipefail

NCCL_VERSION=2.28.9
CUBLAS_VERSION=13.1.0.3

cache_root="${TPEXT_CACHE:-$HOME/.cache/tpext}/cuda-headers"
dest="$cache_root/nccl-${NCCL_VERSION}_cublas-${CUBLAS_VERSION}"

log() { echo "cuda_headers: $*" >&2; }

if [[ -f "$dest/nccl/include/nccl.h" && -f "$dest/cublas/include/cublas_v2.h" ]]; then
  log "cached: $dest"
  echo "$dest"
  exit 0
fi

mkdir -p "$cache_root"
work="$(mktemp -d "$cache_root/.tmp.XXXXXX")"  # same file system as $dest, so the final mv is a rename
trap 'rm -rf "$work"' EXIT

log "downloading nvidia-nccl-cu13==$NCCL_VERSION and nvidia-cublas==$CUBLAS_VERSION (headers only are kept)"
# --platform takes no implied older manylinux tags here (pip 23): name each tag the two wheels use
# (nccl: manylinux_2_18, cublas: manylinux_2_27). --no-cache-dir keeps the wheels out of pip's cache.
python3 -m pip download --no-deps --only-binary=:all: --no-cache-dir --disable-pip-version-check \
  --progress-bar off --quiet \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_18_x86_64 --platform manylinux2014_x86_64 \
  --implementation py --python-version 3 --abi none \
  --dest "$work/wheels" \
  "nvidia-nccl-cu13==$NCCL_VERSION" "nvidia-cublas==$CUBLAS_VERSION" >&2

# Extract nvidia/<pkg>/include/** of each wheel into <out>/include/** (cuBLAS's CUDA 13 wheel keeps its
# headers in nvidia/cu13/include, NCCL's in nvidia/nccl/include: match any nvidia/*/include/).
extract_include() {  # wheel-glob out-dir required-header
  local wheels=("$work"/wheels/$1)
  [[ ${#wheels[@]} -eq 1 && -f "${wheels[0]}" ]] || { log "expected one wheel matching $1"; exit 1; }
  python3 - "${wheels[0]}" "$2" "$3" <<'PY'
import os, re, sys, zipfile
wheel, out, required = sys.argv[1:]
pattern = re.compile(r"^nvidia/[^/]+/include/(.+)$")
count = 0
with zipfile.ZipFile(wheel) as zf:
    for info in zf.infolist():
        m = pattern.match(info.filename)
        if not m or info.is_dir():
            continue
        target = os.path.join(out, "include", m.group(1))
        if ".." in m.group(1).split("/"):
            sys.exit(f"cuda_headers: refusing suspicious member {info.filename}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with zf.open(info) as src, open(target, "wb") as dst:
            dst.write(src.read())
        count += 1
if not os.path.isfile(os.path.join(out, "include", required)):
    sys.exit(f"cuda_headers: {required} not found in {os.path.basename(wheel)}")
print(f"cuda_headers: {count} headers from {os.path.basename(wheel)}", file=sys.stderr)
PY
}
extract_include "nvidia_nccl_cu13-${NCCL_VERSION}-*.whl" "$work/out/nccl" nccl.h
extract_include "nvidia_cublas-${CUBLAS_VERSION}-*.whl" "$work/out/cublas" cublas_v2.h
rm -rf "$work/wheels"
printf 'nvidia-nccl-cu13==%s\nnvidia-cublas==%s\n' "$NCCL_VERSION" "$CUBLAS_VERSION" >"$work/out/VERSIONS"

# Atomic publish: rename fails if another run got there first, and then its entry is as good as ours.
if mv -T "$work/out" "$dest" 2>/dev/null; then
  log "cached: $dest"
elif [[ -f "$dest/nccl/include/nccl.h" && -f "$dest/cublas/include/cublas_v2.h" ]]; then
  log "cached by a concurrent run: $dest"
else
  log "cannot publish $dest (a broken entry? remove it and run again)"
  exit 1
fi
echo "$dest"
