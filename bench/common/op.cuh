// The interface an overlap benchmark's op implements for the shared driver (driver.cuh).
#pragma once

#include "options.cuh"
#include "ranks.cuh"

#include <cmath>
#include <cstdint>
#include <string>

namespace tpext::bench {

// One element of the fp64 host reference.
struct RefValue {
  double value;  // sum over ranks of the exact partial products
  double mag;    // B: sum over ranks of |partial product|
  double abs;    // A: sum over ranks and k of |x w|
};

// Element (row, j) of sum over the `world` ranks of x_q @ w_q.T, rank q's inputs being generated
// tensors 2q (x, [*, k]) and 2q + 1 (w, [n, k]): the reference of the reducing ops.
inline RefValue summed_dot_reference(const DtypeInfo& dt, int world, int64_t row, int64_t j, int64_t k) {
  RefValue v{0, 0, 0};
  for (int q = 0; q < world; ++q) {
    double p = 0;
    for (int64_t t = 0; t < k; ++t) {
      const double xw = input_value(dt, 2 * q, row * k + t) * input_value(dt, 2 * q + 1, j * k + t);
      p += xw;
      v.abs += std::fabs(xw);
    }
    v.value += p;
    v.mag += std::fabs(p);
  }
  return v;
}

// One op family. run()/gemm_alone()/comm_alone() only enqueue work between the driver's fork() and
// join() (ranks.cuh); `seq` selects the sequential baseline's output buffers instead of the chunked ones.
class Op {
 public:
  virtual ~Op() = default;
  virtual const char* name() const = 0;
  virtual bool has_gemm() const { return true; }
  // Reads the options that only this op has; returns what they select ("" for none), for the table
  // and the JSON.
  virtual std::string configure(const Options&) { return ""; }
  // Allocates and fills rank buffers for `s` (throws, naming the option, if the shape cannot run).
  virtual void setup(Ranks& rk, const Shape& s) = 0;
  virtual int64_t chunk_rows() const = 0;  // rows the chunks split: never more chunks than these
  virtual void gemm_alone() = 0;
  virtual void comm_alone() = 0;
  virtual void run(int chunks, int lanes, bool seq) = 0;  // chunks == 1: the sequential baseline
  virtual void reset(bool seq) = 0;                       // 0xFF into outputs and scratch, fresh inputs
  virtual const void* output(int r, bool seq) const = 0;  // [output_rows, output_cols]
  virtual int64_t output_rows() const = 0;
  virtual int64_t output_cols() const = 0;
  virtual RefValue reference(int r, int64_t i, int64_t j) const = 0;
  virtual int summed_ranks() const = 0;     // R for a reduction, 0 for a gather
  virtual int64_t inner() const = 0;        // the GEMM's k (0 without a GEMM)
  virtual double device_flops() const = 0;  // GEMM FLOPs one device executes per run
  virtual double bus_bytes() const = 0;     // nccl-tests: algorithm bytes x bus factor
};

}  // namespace tpext::bench
