// Row partitions shared by every schedule. Torch-free so kernels and host code agree on one rule.
#pragma once

#include <algorithm>
#include <cstdint>

namespace tpext {

// A contiguous block of rows [begin, begin + size).
struct RowRange {
  int64_t begin;
  int64_t size;
};

// Number of chunks actually used for `rows` rows: never more chunks than rows (an empty chunk would
// still cost a collective), and one chunk for zero rows so the loops stay uniform.
inline int64_t effective_chunks(int64_t rows, int64_t chunks) { return std::max<int64_t>(1, std::min(rows, chunks)); }

// Near-even split of `rows` into `parts`: the first rows % parts parts get one row more. Every rank
// computes the same split from the same sizes, so chunk j covers the same rows on all ranks.
inline RowRange split_rows(int64_t rows, int64_t parts, int64_t j) {
  const int64_t base = rows / parts;
  const int64_t extra = rows % parts;
  return {j * base + std::min(j, extra), base + (j < extra ? 1 : 0)};
}

}  // namespace tpext
