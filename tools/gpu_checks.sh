#!/usr/bin/env bash
# Every check and benchmark tpext's CUDA code owes on a GPU machine, in stages, from the repository root:
#
#   bash tools/gpu_checks.sh build            # CUDA extension (pip -e) + CMake targets (kernel tests, benches)
#   bash tools/gpu_checks.sh test             # pytest -m gpu, ctest, the C++ benches' --check runs
#   bash tools/gpu_checks.sh sanitize         # compute-sanitizer memcheck / racecheck / synccheck on the kernel tests
#   bash tools/gpu_checks.sh bench            # the benchmarks of docs/cuda.md, docs/p2p.md, docs/benchmarks-cuda.md
#   bash tools/gpu_checks.sh build test       # several stages, in order
#   bash tools/gpu_checks.sh quick            # what fits a 15-minute GPU lease, into one archive (below)
#
# `quick` builds (extension, then only the CMake targets it runs), runs `pytest -m "gpu and not slow"` (all
# GPU tests but the two-process NCCL_HOSTID one), the P2P timeout test, compute-sanitizer memcheck on the
# kernel tests, and the
# three headline figures: the decomposition tax at M = 4096, the P2P all-reduce of 32 KB, and the fused
# all-reduce + residual + RMSNorm against unfused. It then packs the summary, the logs and the JSON into
# ${TPEXT_GPU_ARCHIVE_DIR:-<logs>}/tpext-gpu-quick-<device>-<commit>.tar.gz (a few hundred KB; named in
# letters, digits, '.', '-' only, so it can be copied out as it is). Measured budget: see docs/cuda.md.
#
# TPEXT_GPU_DRY_RUN=1 rehearses any stage on a machine without a GPU: the build steps run for real, and each
# GPU step runs its real command too, which must then fail only for want of a GPU (its log names the
# missing device, not a bad flag or a missing file); pytest only collects. Each such step is "dry-ok".
#
# Each step runs even when an earlier one failed; its command and output go to <logs>/<step>.log and one
# line per step (status, seconds, name) to <logs>/summary.txt (this invocation's), printed at the end. The exit status is the
# number of failed steps (0: all passed). Benchmark JSON goes to bench/results/<device>/ (the lower-cased
# GPU name, as docs/cuda.md says), tagged with TPEXT_COMMIT; logs go to ${TPEXT_GPU_LOGS:-build/gpu-checks}.
# Multi-GPU steps (the layer bench over NCCL, the 8-GPU overlap benches) run only when that many GPUs
# are visible.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1
logs="${TPEXT_GPU_LOGS:-$root/build/gpu-checks}"
mkdir -p "$logs"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
export TPEXT_COMMIT="${TPEXT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"

failed=0
: >"$logs/summary.txt"  # this invocation's steps only
# step NAME CMD...: runs CMD (through bash -c when it is one string); <logs>/NAME.log gets the command,
# then its output.
step() {
  local name="$1"; shift
  local start=$SECONDS rc status=ok
  echo "=== $name"
  printf '$ %s\n' "$*" >"$logs/$name.log"
  if (( $# == 1 )); then bash -c "$1" >>"$logs/$name.log" 2>&1; else "$@" >>"$logs/$name.log" 2>&1; fi
  rc=$?
  (( rc == 0 )) || { status="FAIL(rc=$rc)"; failed=$((failed + 1)); tail -n 20 "$logs/$name.log"; }
  printf '%-12s %5ds  %s\n' "$status" $((SECONDS - start)) "$name" | tee -a "$logs/summary.txt"
}

# gpu_step NAME CMD...: a step that needs the GPU. In a dry run (TPEXT_GPU_DRY_RUN=1, no GPU) the command
# still runs, and passes as "dry-ok" when it failed for want of a device and for nothing else.
NO_GPU='no CUDA-capable device|cudaErrorNoDevice|CUDA driver version is insufficient|Found no NVIDIA driver|no CUDA GPUs are available|Torch not compiled with CUDA|needs a CUDA device|needs an NVIDIA GPU|no CUDA device'
gpu_step() {
  if [[ "${TPEXT_GPU_DRY_RUN:-0}" != 1 ]]; then step "$@"; return; fi
  local name="$1"; shift
  local start=$SECONDS status
  echo "=== $name (dry run)"
  printf '$ %s\n' "$*" >"$logs/$name.log"
  if (( $# == 1 )); then bash -c "$1" >>"$logs/$name.log" 2>&1; else "$@" >>"$logs/$name.log" 2>&1; fi
  if (( $? == 0 )); then
    status=ok
  elif grep -Eq "$NO_GPU" "$logs/$name.log" && ! grep -Eq 'usage:|unknown argument|expected |No such file|command not found|Traceback \(most recent call last\):.*(Argument|Import)Error' "$logs/$name.log"; then
    status=dry-ok
  else
    status=FAIL; failed=$((failed + 1)); tail -n 20 "$logs/$name.log"
  fi
  printf '%-12s %5ds  %s\n' "$status" $((SECONDS - start)) "$name" | tee -a "$logs/summary.txt"
}

gpus() { nvidia-smi --list-gpus 2>/dev/null | wc -l; }
device_dir() {
  local name
  name="$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null | head -n 1)"
  echo "bench/results/$(echo "${name:-unknown-gpu}" | tr 'A-Z' 'a-z' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')"
}

build_extension() {
  gpu_step env "nvcc --version | tail -n 2; $py -c 'import torch; print(torch.__version__, torch.version.cuda)'
      command -v nvidia-smi >/dev/null && nvidia-smi || { echo 'Found no NVIDIA driver (nvidia-smi missing or failing)'; exit 1; }"
  step pip_install "$py -m pip install -q --no-build-isolation --no-deps -e . && $py -c 'import tpext; assert tpext.cuda_compiled, \"tpext built without CUDA\"; print(\"tpext.cuda_compiled\", tpext.cuda_compiled)'"
}

# build_cmake [TARGET...]: configure (it must link the benches: no 'compiled, not linked' line; NCCL/cuBLAS
# from site-packages/nvidia), then build the named targets, or all.
build_cmake() {
  local targets=""
  (( $# == 0 )) || targets="--target $*"
  step cmake "set -o pipefail; mkdir -p build && cmake -S . -B build -G Ninja -DTPEXT_REQUIRE_LINK=ON | tee build/configure.log &&
      ! grep 'not linked' build/configure.log && cmake --build build --parallel $(nproc) $targets"
}

stage_build() {
  build_extension
  build_cmake
}

stage_test() {
  # On a GPU machine a skipped GPU test is a failure (a missing CUDA build, say), not a pass.
  step pytest_gpu "out=\$($py -m pytest -q -rs -m gpu --timeout 600 tests/test_cuda_ops.py tests/test_p2p_gpu.py 2>&1)
      rc=\$?; echo \"\$out\"; [ \$rc -eq 0 ] && ! grep -q SKIPPED <<<\"\$out\""
  step ctest "ctest --test-dir build --output-on-failure --no-tests=error"
  local dt
  for dt in bf16 fp16 fp32; do
    step "check_overlap_$dt" "set -e
      build/tpext_bench_gemm_all_reduce     --virtual-ranks 3 --m 1001 --n 96 --k 40 --chunks 1,2,3,7 --streams 1,2 --dtype $dt --check
      build/tpext_bench_gemm_reduce_scatter --virtual-ranks 3 --m 999 --n 96 --k 40 --chunks 1,2,3,7 --streams 1,2 --dtype $dt --check
      build/tpext_bench_all_gather_gemm     --virtual-ranks 3 --m 999 --n 96 --k 40 --chunks 1,2,3,7 --streams 1,2 --dtype $dt --check
      build/tpext_bench_all_reduce          --virtual-ranks 3 --m 1001 --n 96 --chunks 1,2,3,7 --dtype $dt --p2p-algo 1 --check
      build/tpext_bench_all_reduce          --virtual-ranks 3 --m 1001 --n 96 --chunks 1,2,3,7 --dtype $dt --p2p-algo 2 --check
      build/tpext_bench_gemm_all_reduce     --gpus 1 --m 1001 --n 96 --k 40 --chunks 1,3,7 --streams 1,2 --dtype $dt --check"
  done
  step check_all_gather_chunk_major "build/tpext_bench_all_gather_gemm --virtual-ranks 3 --m 999 --n 96 --k 40 --chunks 1,2,3,7 --streams 1,2 --gather chunk-major --check"
  # Hidden 1001 is no multiple of any vector width: the element-wise kernels.
  step check_p2p_rmsnorm "set -e
      build/tpext_bench_p2p_rmsnorm --ranks 3 --rows 1,7,130 --hidden 8192 --check
      build/tpext_bench_p2p_rmsnorm --ranks 8 --rows 1,7,130 --hidden 1001 --check"
}

stage_sanitize() {
  local t tool
  for t in epilogue p2p; do
    for tool in memcheck racecheck synccheck; do
      step "sanitize_${t}_$tool" compute-sanitizer --tool "$tool" --error-exitcode 1 "build/tpext_test_$t"
    done
  done
}

stage_bench() {
  local d R op
  d="$(device_dir)"
  mkdir -p "$d"
  step bench_gemm_decomposition "$py bench/gemm_decomposition.py --out $d/gemm_decomposition.json"
  step bench_sm_contention "build/tpext_bench_sm_contention --json $d/sm_contention.json"
  step bench_epilogue_bw "build/tpext_bench_epilogue_bw --json $d/epilogue_bw.json"
  step bench_p2p_rmsnorm "build/tpext_bench_p2p_rmsnorm --ranks 8 --json $d/p2p_rmsnorm.json"
  # P2P kernel time vs message size, 16 B to 64 MB per rank (bf16: n elements of 2 bytes), 8 virtual ranks.
  local sizes="8,64,512,4096,16384,65536,262144,1048576,4194304,33554432"
  step bench_p2p_one_shot "build/tpext_bench_all_reduce --virtual-ranks 8 --m 1 --n $sizes --chunks 1 --p2p-algo 1 --json $d/p2p_all_reduce_one_shot_virtual8.json"
  step bench_p2p_two_shot "build/tpext_bench_all_reduce --virtual-ranks 8 --m 1 --n $sizes --chunks 1 --p2p-algo 2 --json $d/p2p_all_reduce_two_shot_virtual8.json"
  for R in 2 4; do
    step "bench_gemm_all_reduce_virtual$R" "build/tpext_bench_gemm_all_reduce --virtual-ranks $R --m 4096,16384 --n 8192 --k 1024,7168 --streams 1,2 --json $d/gemm_all_reduce_virtual$R.json"
    step "bench_gemm_reduce_scatter_virtual$R" "build/tpext_bench_gemm_reduce_scatter --virtual-ranks $R --m 4096,16384 --n 8192 --k 1024,7168 --streams 1,2 --json $d/gemm_reduce_scatter_virtual$R.json"
    step "bench_all_gather_gemm_virtual$R" "build/tpext_bench_all_gather_gemm --virtual-ranks $R --m 4096,16384 --n 2048,7168 --k 8192 --streams 1,2 --json $d/all_gather_gemm_virtual$R.json"
    step "bench_all_gather_gemm_chunk_major_virtual$R" "build/tpext_bench_all_gather_gemm --virtual-ranks $R --m 4096,16384 --n 2048,7168 --k 8192 --streams 1,2 --gather chunk-major --json $d/all_gather_gemm_chunk_major_virtual$R.json"
  done
  step bench_gemm_all_reduce_nccl1 "build/tpext_bench_gemm_all_reduce --gpus 1 --m 4096,16384 --n 8192 --k 1024,7168 --json $d/gemm_all_reduce_nccl1.json"
  if (( $(gpus) >= 2 )); then  # NCCL takes one GPU per rank: the layer bench needs tp >= 2 GPUs
    step bench_layers "$py -m tpext bench --backend nccl --no-progress --out $d --calibration $d/calibration.json"
  fi
  if (( $(gpus) >= 8 )); then
    for op in gemm_all_reduce gemm_reduce_scatter; do
      step "bench_${op}_nccl8" "build/tpext_bench_$op --gpus 8 --m 4096,16384 --n 8192 --k 1024,3584 --streams 1,2 --json $d/${op}_nccl8.json"
    done
    step bench_all_gather_gemm_nccl8 "build/tpext_bench_all_gather_gemm --gpus 8 --m 4096,16384 --n 1024,3584 --k 8192 --streams 1,2 --json $d/all_gather_gemm_nccl8.json"
    step bench_all_reduce_nccl8 "build/tpext_bench_all_reduce --gpus 8 --m 4096,16384 --n 8192 --json $d/all_reduce_nccl8.json"
  fi
  cp "$logs"/bench_*.log "$d/" 2>/dev/null
}

stage_quick() {
  local d name archive
  d="$(device_dir)"
  [[ "${TPEXT_GPU_DRY_RUN:-0}" == 1 ]] && d="${logs#"$root"/}/dry-run-results"  # no device to name a folder after
  mkdir -p "$d"
  build_extension
  build_cmake tpext_test_epilogue tpext_test_p2p tpext_test_p2p_timeout tpext_bench_all_reduce tpext_bench_p2p_rmsnorm
  if [[ "${TPEXT_GPU_DRY_RUN:-0}" == 1 ]]; then
    step pytest_gpu_collect "$py -m pytest -q --collect-only -m 'gpu and not slow' tests/test_cuda_ops.py tests/test_p2p_gpu.py | tail -n 3 | grep -E '[1-9][0-9]* (tests )?(selected|collected)'"
  else
    step pytest_gpu "out=\$($py -m pytest -q -rs -m 'gpu and not slow' --timeout 300 tests/test_cuda_ops.py tests/test_p2p_gpu.py 2>&1)
        rc=\$?; echo \"\$out\"; [ \$rc -eq 0 ] && ! grep -q SKIPPED <<<\"\$out\""
  fi
  # The bounded P2P waits: a rank that never arrives makes its peers return with an abort code.
  gpu_step p2p_timeout "build/tpext_test_p2p_timeout"
  for name in epilogue p2p; do
    gpu_step "sanitize_${name}_memcheck" "command -v compute-sanitizer >/dev/null || { echo 'compute-sanitizer is not installed'; [ \"\${TPEXT_GPU_DRY_RUN:-0}\" = 1 ] && build/tpext_test_$name; exit 1; }
        compute-sanitizer --tool memcheck --error-exitcode 1 build/tpext_test_$name"
  done
  gpu_step bench_decomposition_m4096 "$py bench/gemm_decomposition.py --shapes 4096x8192x8192 --chunks 2,4,8 --repeats 20 --out $d/gemm_decomposition_m4096.json"
  # 32 KB per rank: 16384 bf16 elements in one row, one- and two-shot, 8 virtual ranks on one GPU.
  gpu_step bench_p2p_all_reduce_32k "set -e
      build/tpext_bench_all_reduce --virtual-ranks 8 --m 1 --n 16384 --chunks 1 --p2p-algo 1 --json $d/p2p_all_reduce_32k_one_shot.json
      build/tpext_bench_all_reduce --virtual-ranks 8 --m 1 --n 16384 --chunks 1 --p2p-algo 2 --json $d/p2p_all_reduce_32k_two_shot.json"
  gpu_step bench_p2p_rmsnorm "build/tpext_bench_p2p_rmsnorm --ranks 8 --json $d/p2p_rmsnorm.json"
  archive="${TPEXT_GPU_ARCHIVE_DIR:-$logs}/tpext-gpu-quick-$(basename "$d")-$TPEXT_COMMIT.tar.gz"
  mkdir -p "$(dirname "$archive")"
  cp "$logs/summary.txt" "$logs/quick-summary.txt"
  # Logs and this run's JSON (the device folder's other files are older runs', already in the repo),
  # packed beside the logs under a temporary name, then renamed: never an archive of itself.
  tar -czf "$archive.part" --exclude='*.tar.gz' --exclude='*.tar.gz.part' -C "$root" "${logs#"$root"/}" \
      $(cd "$root" && find "${d}" -newer "$logs/env.log" -type f 2>/dev/null) && mv "$archive.part" "$archive"
  echo "gpu_checks: archive $archive ($(du -h "$archive" | cut -f1))" | tee -a "$logs/summary.txt"
}

(( $# > 0 )) || { sed -n '2,9p' "${BASH_SOURCE[0]}"; exit 2; }
for stage in "$@"; do
  case "$stage" in
    build | test | sanitize | bench | quick) "stage_$stage" ;;
    *) echo "gpu_checks: unknown stage '$stage' (build, test, sanitize, bench, quick)" >&2; exit 2 ;;
  esac
done
echo "--- summary ($logs/summary.txt), commit $TPEXT_COMMIT"
cat "$logs/summary.txt"
exit "$failed"
