// Row-major GEMM through cuBLAS, the layout of tpext's ops: C[m, n] = A[m, k] @ B[n, k]^T, as
// torch's x @ w.T with a weight w of shape [out_features, in_features].
#pragma once

#include "common/cublas_check.h"
#include "dtype.cuh"

#include <cublas_v2.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace tpext::bench {

struct GemmArgs {
  const void* a;
  int64_t lda;  // [m, k] row-major, row stride lda
  const void* b;
  int64_t ldb;  // [n, k] row-major, row stride ldb
  void* c;
  int64_t ldc;  // [m, n] row-major, row stride ldc
  int64_t m, n, k;
};

// `rows` rows of y = x @ w^T, x [*, k] and y [*, n] contiguous row-major, w [n, k]: x's rows from row
// x_row, written from row y_row of y.
inline GemmArgs linear_rows(const DtypeInfo& dt, void* x, int64_t x_row, const void* w, void* y, int64_t y_row,
                            int64_t rows, int64_t n, int64_t k) {
  return {advance(x, x_row * k, dt), k, w, k, advance(y, y_row * n, dt), n, rows, n, k};
}

inline int as_int(int64_t v, const char* what) {
  if (v < 0 || v > INT_MAX)
    throw std::runtime_error(std::string("gemm: ") + what + " = " + std::to_string(v) + " does not fit cuBLAS's int");
  return static_cast<int>(v);
}

// Runs on the stream the handle is bound to. Inputs and output in dt, products accumulated in fp32
// (CUBLAS_COMPUTE_32F: no TF32 for fp32 data). cuBLAS is column-major, so the row-major C is
// computed as its transpose: C^T[n, m] = B[n, k] (read as the column-major k x n matrix, transposed)
// times A^T (the row-major [m, k] read as column-major k x m).
inline void gemm(cublasHandle_t h, const DtypeInfo& dt, const GemmArgs& g) {
  if (g.m == 0 || g.n == 0) return;
  const float one = 1.f, zero = 0.f;
  TPEXT_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, as_int(g.n, "n"), as_int(g.m, "m"), as_int(g.k, "k"),
                                  &one, g.b, dt.cuda, as_int(g.ldb, "ldb"), g.a, dt.cuda, as_int(g.lda, "lda"), &zero,
                                  g.c, dt.cuda, as_int(g.ldc, "ldc"), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace tpext::bench
