// Row permutation between token order and expert-sorted order: the C++ interface of the kernels.
//
// This header has no CUDA or PyTorch includes, so the pybind11 bindings compile as plain C++.
//
// Layout (see switch_dit_kernels/routing.py): R route units of N contiguous rows each (T = R*N
// token rows of D elements), k experts per unit, pair p = r*k + j. The expert-sorted space has
// R*k*N rows; pair p occupies sorted rows [s*N, (s+1)*N) with s = pair_to_sorted[p].
#pragma once

#include <cstdint>

namespace sdk {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum class IndexType : int { kInt32 = 0, kInt64 = 1 };

struct RowPermuteArgs {
  void* dst = nullptr;                 // output rows
  const void* src = nullptr;           // input rows
  const void* pair_to_sorted = nullptr;  // [R*k] int32/int64
  const float* weights = nullptr;      // [R*k] float32, or nullptr for unit weights
  const void* other = nullptr;         // scatter with dots: h [R*k*N, D] (sorted rows)
  float* dots = nullptr;               // scatter with dots: [R*k*N] float32, (pair, n) order
  int64_t num_routes = 0;              // R
  int64_t k = 1;
  int64_t tokens_per_route = 1;        // N
  int64_t dim = 0;                     // D, elements per row
  DType dtype = DType::kFloat32;
  IndexType index_type = IndexType::kInt32;
  void* stream = nullptr;              // cudaStream_t; ignored on the host
  bool on_host = false;                // run the same row code on the CPU (tests, CPU tensors)
};

// dst[(s_p*N + n)] = w_p * src[r*N + n] for every pair p = r*k + j of token row r*N + n
// (permute when weights is null; the dh part of unpermute's backward otherwise). When dots is set,
// also dots[p*N + n] = <src[r*N + n], other[s_p*N + n]> in float32 (unpermute's dweights, before
// the sum over n). Each token row is read once and written k times.
// Returns nullptr on success, else a static error message.
const char* scatter_rows(const RowPermuteArgs& args);

// dst[r*N + n] = sum_j w_p * src[s_p*N + n], p = r*k + j, accumulated in float32 in j order
// (deterministic): unpermute, and permute's backward when weights is null.
const char* gather_rows(const RowPermuteArgs& args);

// True when rows move as 16-byte vectors: D*sizeof(T) % 16 == 0 and every row pointer in args
// (dst, src, other) is 16-byte aligned. Otherwise the kernels copy element by element.
bool vectorized(const RowPermuteArgs& args);

// Size in bytes of one element of dtype.
int dtype_size(DType dtype);

}  // namespace sdk
