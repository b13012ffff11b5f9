#!/usr/bin/env bash
# CUDA compiler launcher (CMake CUDA_COMPILER_LAUNCHER) for the kernels library when TPEXT_PTXAS_VERBOSE
# is on: runs the nvcc command unchanged, and keeps its stderr (where -Xptxas=-v writes the registers,
# stack frame and spill bytes of every kernel) in <object>.ptxas.log beside the object it makes. The log
# lives as long as the object, so tools/cuda_compile_check.sh can report spills after an incremental
# build that recompiled nothing. Its other stderr (and all of it when nvcc fails) is passed through.
set -u
out=""
prev=""
for arg in "$@"; do
  [[ "$prev" == "-o" ]] && out="$arg"
  prev="$arg"
done
if [[ -z "$out" ]]; then exec "$@"; fi
"$@" 2>"$out.ptxas.log"
rc=$?
if [[ $rc -ne 0 ]]; then
  cat "$out.ptxas.log" >&2
else  # the resource report stays in the log file; anything else nvcc said is passed on
  grep -v -E '^ptxas info|^ +[0-9]+ bytes stack frame' "$out.ptxas.log" >&2 || true
fi
exit "$rc"
