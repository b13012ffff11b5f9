#!/usr/bin/env bash
# C++/CUDA house style: every tracked .cpp/.h/.cu/.cuh under csrc/, tests/cpp/ and bench/ formatted as
# .clang-format says. CI (.ci/run) runs it with the pinned clang-format wheel below.
#
#   tools/check_cpp_format.sh          # exit 0: all formatted; non-zero: the diagnostics of each file off
#   tools/check_cpp_format.sh --fix    # rewrite the files in place
#
# CLANG_FORMAT picks the binary (default: clang-format on PATH). Other versions may format differently:
# install the pinned one with `pip install clang-format==19.1.7`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
clang_format="${CLANG_FORMAT:-clang-format}"
command -v "$clang_format" >/dev/null || { echo "check_cpp_format: $clang_format not found (pip install clang-format==19.1.7)" >&2; exit 1; }
mapfile -t files < <(git ls-files -- csrc tests/cpp bench | grep -E '\.(cpp|h|cu|cuh)$')
echo "check_cpp_format: $("$clang_format" --version), ${#files[@]} files"
if [[ "${1:-}" == "--fix" ]]; then
  "$clang_format" -i "${files[@]}"
else
  "$clang_format" --dry-run --Werror "${files[@]}"
fi
