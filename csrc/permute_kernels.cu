// Permutation kernels and their dispatch over dtype, index type and vector width.
//
// One group of G lanes per token row, G = the smallest power of two >= the packs per row, at most
// 32 (D = 1152 bf16: 144 packs, G = 32; D = 64 bf16: 8 packs, G = 8 and four rows per warp).
// Rows are independent, so there is no shared memory and no atomics: results are deterministic.
#include <algorithm>

#include "permute.h"
#include "permute_rows.cuh"

namespace sdk {
namespace {

constexpr int kThreads = 256;
// Grid-stride past this many blocks; 2^20 blocks x 8 rows covers 8M rows per sweep.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

enum Mode { kScatter = 0, kScatterDot = 1, kGather = 2 };

// Per-row work of mode M; K > 0: k == K known at compile time (the fixed-k row functions).
template <int M, int K, typename Op>
SDK_HD void row_work(const Op& op, int64_t t, int lane, int group) {
  if constexpr (M == kScatter) {
    if constexpr (K > 0) op.template scatter_lane_k<K>(t, lane, group);
    else op.scatter_lane(t, lane, group);
  } else {
    if constexpr (K > 0) op.template gather_lane_k<K>(t, lane, group);
    else op.gather_lane(t, lane, group);
  }
}

template <typename Op, int M, int K>
__global__ void __launch_bounds__(kThreads) row_kernel(const Op op, const int group) {
  const int lane = threadIdx.x & (group - 1);
  const int groups_per_block = kThreads / group;
  const int64_t first = static_cast<int64_t>(threadIdx.x / group);
  // The loop bound depends only on the block, so every lane of a warp runs the same iterations
  // and reaches the shuffles below together, valid row or not.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * groups_per_block; base < op.rows;
       base += static_cast<int64_t>(gridDim.x) * groups_per_block) {
    const int64_t t = base + first;
    const bool valid = t < op.rows;
    if constexpr (M != kScatterDot) {
      if (valid) row_work<M, K>(op, t, lane, group);
    } else {
      for (int64_t j = 0; j < op.k; ++j) {
        float part = valid ? op.scatter_dot_lane(t, j, lane, group) : 0.0f;
        // Fixed butterfly over the group's lanes: the same order on every run.
        for (int off = group / 2; off > 0; off >>= 1)
          part += __shfl_xor_sync(0xffffffffu, part, off, group);
        if (valid && lane == 0) {
          const int64_t r = t / op.n_per, n = t - r * op.n_per;
          op.dots[(r * op.k + j) * op.n_per + n] = part;
        }
      }
    }
  }
}

// The same row code on the CPU, lane by lane; the dot product's butterfly is replayed exactly.
template <int M, int K, typename Op>
void run_on_host(const Op& op, int group) {
  float part[32], next[32];
  for (int64_t t = 0; t < op.rows; ++t) {
    if constexpr (M != kScatterDot) {
      for (int lane = 0; lane < group; ++lane) row_work<M, K>(op, t, lane, group);
    } else {
      for (int64_t j = 0; j < op.k; ++j) {
        for (int lane = 0; lane < group; ++lane) part[lane] = op.scatter_dot_lane(t, j, lane, group);
        for (int off = group / 2; off > 0; off >>= 1) {
          for (int lane = 0; lane < group; ++lane) next[lane] = part[lane] + part[lane ^ off];
          std::copy(next, next + group, part);
        }
        const int64_t r = t / op.n_per, n = t - r * op.n_per;
        op.dots[(r * op.k + j) * op.n_per + n] = part[0];
      }
    }
  }
}

int group_size(int64_t packs) {
  int g = 1;
  while (g < 32 && g < packs) g *= 2;
  return g;
}

template <int M, int K, typename Op>
const char* launch_op(const Op& op, const RowPermuteArgs& a) {
  const int group = group_size(op.packs);
  if (a.on_host) {
    run_on_host<M, K>(op, group);
    return nullptr;
  }
  const int64_t rows_per_block = kThreads / group;
  const int64_t blocks = std::min((op.rows + rows_per_block - 1) / rows_per_block, kMaxBlocks);
  row_kernel<Op, M, K><<<static_cast<unsigned>(blocks), kThreads, 0,
                         static_cast<cudaStream_t>(a.stream)>>>(op, group);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename T, typename I, int V>
const char* launch(const RowPermuteArgs& a, Mode mode) {
  RowOp<T, I, V> op;
  op.dst = static_cast<T*>(a.dst);
  op.src = static_cast<const T*>(a.src);
  op.pair_to_sorted = static_cast<const I*>(a.pair_to_sorted);
  op.weights = a.weights;
  op.other = static_cast<const T*>(a.other);
  op.dots = a.dots;
  op.rows = a.num_routes * a.tokens_per_route;
  op.n_per = a.tokens_per_route;
  op.k = a.k;
  op.packs = static_cast<int>(a.dim / V);
  // k = 2 (the usual top-2) on the 16-byte path gets the fixed-k row code; other cases share
  // the runtime-k code (fewer instantiations keep the build under a minute per architecture).
  if constexpr (V > 1) {
    if (a.k == 2 && mode == kScatter) return launch_op<kScatter, 2>(op, a);
    if (a.k == 2 && mode == kGather) return launch_op<kGather, 2>(op, a);
  }
  switch (mode) {
    case kScatter: return launch_op<kScatter, 0>(op, a);
    case kScatterDot: return launch_op<kScatterDot, 0>(op, a);
    case kGather: return launch_op<kGather, 0>(op, a);
  }
  return "unknown mode";
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, typename I>
const char* dispatch_vec(const RowPermuteArgs& a, Mode mode) {
  if (vectorized(a)) return launch<T, I, 16 / sizeof(T)>(a, mode);
  return launch<T, I, 1>(a, mode);
}

template <typename T>
const char* dispatch_index(const RowPermuteArgs& a, Mode mode) {
  switch (a.index_type) {
    case IndexType::kInt32: return dispatch_vec<T, int32_t>(a, mode);
    case IndexType::kInt64: return dispatch_vec<T, int64_t>(a, mode);
  }
  return "unknown index type";
}

const char* dispatch(const RowPermuteArgs& a, Mode mode) {
  if (a.num_routes == 0 || a.dim == 0) return nullptr;  // nothing to move; a 0-block grid is an error
  switch (a.dtype) {
    case DType::kFloat32: return dispatch_index<float>(a, mode);
    case DType::kFloat16: return dispatch_index<__half>(a, mode);
    case DType::kBFloat16: return dispatch_index<__nv_bfloat16>(a, mode);
  }
  return "unknown dtype";
}

}  // namespace

int dtype_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

bool vectorized(const RowPermuteArgs& a) {
  const int64_t row_bytes = a.dim * dtype_size(a.dtype);
  return row_bytes % 16 == 0 && aligned16(a.dst) && aligned16(a.src) && aligned16(a.other);
}

const char* scatter_rows(const RowPermuteArgs& args) {
  return dispatch(args, args.dots ? kScatterDot : kScatter);
}

const char* gather_rows(const RowPermuteArgs& args) { return dispatch(args, kGather); }

}  // namespace sdk
