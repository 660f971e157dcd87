// Per-row work of the permutation kernels, callable from a CUDA kernel and from host code.
//
// A "group" of G lanes (G a power of two <= 32, all in one warp) moves one token row: lane l
// handles the packs l, l + G, l + 2G, ... of the row. The device kernels run one group per row;
// the host path (tests, CPU tensors) calls the same functions for every lane in turn, so the
// indexing code that runs on the GPU is the code the CPU tests check.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#define SDK_HD __host__ __device__ __forceinline__

namespace sdk {

template <typename T> SDK_HD float to_f32(T v);
template <> SDK_HD float to_f32<float>(float v) { return v; }
template <> SDK_HD float to_f32<__half>(__half v) { return __half2float(v); }
template <> SDK_HD float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> SDK_HD T from_f32(float v);
template <> SDK_HD float from_f32<float>(float v) { return v; }
template <> SDK_HD __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> SDK_HD __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// V elements moved as one access. With V * sizeof(T) == 16 the struct is 16-byte aligned and a
// load/store of it is one ld.global.v4 / st.global.v4: a 2,304-byte bf16 row (D = 1152) is 144
// such accesses instead of 1,152.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Packs each lane loads before its first store: 4 x 16 B in flight per lane keeps enough bytes
// outstanding (~64 KiB per SM at full occupancy) to cover HBM latency on H100/H200.
constexpr int kUnroll = 4;

template <typename T, typename I, int V>
struct RowOp {
  using P = Pack<T, V>;

  T* dst;
  const T* src;
  const I* pair_to_sorted;  // [R*k]
  const float* weights;     // [R*k] or nullptr (unit weights)
  const T* other;           // scatter with dots: sorted rows h
  float* dots;              // scatter with dots: [R*k*N]
  int64_t rows;             // token rows R*N: one group per row
  int64_t n_per;            // N
  int64_t k;
  int packs;                // D / V (< 2^31: checked by the bindings)

  // Sorted row of pair r*k + j for token n of unit r.
  SDK_HD int64_t sorted_row(int64_t r, int64_t n, int64_t j) const {
    return static_cast<int64_t>(pair_to_sorted[r * k + j]) * n_per + n;
  }

  SDK_HD float weight(int64_t r, int64_t j) const { return weights ? weights[r * k + j] : 1.0f; }

  SDK_HD static P scaled(const P& x, float w) {
    P out;
#pragma unroll
    for (int e = 0; e < V; ++e) out.v[e] = from_f32<T>(w * to_f32<T>(x.v[e]));
    return out;
  }

  // Token row t: read it once, write it to its k sorted rows (scaled when weights are given; an
  // unscaled copy moves raw bits, so it is exact for every value, NaN payloads included).
  SDK_HD void scatter_lane(int64_t t, int lane, int group) const {
    const int64_t r = t / n_per, n = t - r * n_per;
    const P* s = reinterpret_cast<const P*>(src) + t * packs;
    for (int p0 = lane; p0 < packs; p0 += group * kUnroll) {
      P buf[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int p = p0 + u * group;
        if (p < packs) buf[u] = s[p];
      }
      for (int64_t j = 0; j < k; ++j) {
        P* d = reinterpret_cast<P*>(dst) + sorted_row(r, n, j) * packs;
        const float w = weight(r, j);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int p = p0 + u * group;
          if (p < packs) d[p] = weights ? scaled(buf[u], w) : buf[u];
        }
      }
    }
  }

  // scatter_lane for k == K known at compile time (k = 2 is the common case): the K sorted rows
  // and weights are read once per row instead of once per chunk, so no index load sits between
  // a chunk's loads and its stores.
  template <int K>
  SDK_HD void scatter_lane_k(int64_t t, int lane, int group) const {
    const int64_t r = t / n_per, n = t - r * n_per;
    const P* s = reinterpret_cast<const P*>(src) + t * packs;
    P* d[K];
    float w[K];
#pragma unroll
    for (int j = 0; j < K; ++j) {
      d[j] = reinterpret_cast<P*>(dst) + sorted_row(r, n, j) * packs;
      w[j] = weight(r, j);
    }
    for (int p0 = lane; p0 < packs; p0 += group * kUnroll) {
      P buf[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int p = p0 + u * group;
        if (p < packs) buf[u] = s[p];
      }
#pragma unroll
      for (int j = 0; j < K; ++j) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int p = p0 + u * group;
          if (p < packs) d[j][p] = weights ? scaled(buf[u], w[j]) : buf[u];
        }
      }
    }
  }

  // gather_lane for k == K known at compile time: all K x kUnroll loads of a chunk are issued
  // before the first add (2 x 4 x 16 B in flight per lane at k = 2), and the sum needs no
  // separate accumulator registers. Same float32 sum in j order as gather_lane.
  template <int K>
  SDK_HD void gather_lane_k(int64_t t, int lane, int group) const {
    const int64_t r = t / n_per, n = t - r * n_per;
    P* d = reinterpret_cast<P*>(dst) + t * packs;
    const P* s[K];
    float w[K];
#pragma unroll
    for (int j = 0; j < K; ++j) {
      s[j] = reinterpret_cast<const P*>(src) + sorted_row(r, n, j) * packs;
      w[j] = weight(r, j);
    }
    for (int p0 = lane; p0 < packs; p0 += group * kUnroll) {
      P buf[K][kUnroll];
#pragma unroll
      for (int j = 0; j < K; ++j) {
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int p = p0 + u * group;
          if (p < packs) buf[j][u] = s[j][p];
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int p = p0 + u * group;
        if (p >= packs) continue;
        P out;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          float acc = w[0] * to_f32<T>(buf[0][u].v[e]);
#pragma unroll
          for (int j = 1; j < K; ++j) acc = acc + w[j] * to_f32<T>(buf[j][u].v[e]);
          out.v[e] = from_f32<T>(acc);
        }
        d[p] = out;
      }
    }
  }

  // Token row t, slot j: write w * src to the sorted row and return this lane's share of
  // <src row, other row> (float32, packs in lane order). The caller sums the G lanes' shares.
  SDK_HD float scatter_dot_lane(int64_t t, int64_t j, int lane, int group) const {
    const int64_t r = t / n_per, n = t - r * n_per;
    const int64_t srow = sorted_row(r, n, j);
    const float w = weight(r, j);
    const P* s = reinterpret_cast<const P*>(src) + t * packs;
    const P* o = reinterpret_cast<const P*>(other) + srow * packs;
    P* d = reinterpret_cast<P*>(dst) + srow * packs;
    float acc = 0.0f;
    for (int p0 = lane; p0 < packs; p0 += group * kUnroll) {
      P sb[kUnroll], ob[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int p = p0 + u * group;
        if (p < packs) {
          sb[u] = s[p];
          ob[u] = o[p];
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int p = p0 + u * group;
        if (p < packs) {
          d[p] = scaled(sb[u], w);
#pragma unroll
          for (int e = 0; e < V; ++e) acc += to_f32<T>(sb[u].v[e]) * to_f32<T>(ob[u].v[e]);
        }
      }
    }
    return acc;
  }

  // Token row t = sum over j of w * (its sorted row j), float32 accumulation in j order. The
  // first term initialises the sum (no 0 + x), so k = 1 with unit weight is an exact copy.
  SDK_HD void gather_lane(int64_t t, int lane, int group) const {
    const int64_t r = t / n_per, n = t - r * n_per;
    P* d = reinterpret_cast<P*>(dst) + t * packs;
    for (int p0 = lane; p0 < packs; p0 += group * kUnroll) {
      float acc[kUnroll][V];
      for (int64_t j = 0; j < k; ++j) {
        const P* s = reinterpret_cast<const P*>(src) + sorted_row(r, n, j) * packs;
        const float w = weight(r, j);
        P buf[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          const int p = p0 + u * group;
          if (p < packs) buf[u] = s[p];
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          if (p0 + u * group >= packs) continue;
#pragma unroll
          for (int e = 0; e < V; ++e) {
            const float a = w * to_f32<T>(buf[u].v[e]);
            acc[u][e] = (j == 0) ? a : acc[u][e] + a;
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int p = p0 + u * group;
        if (p < packs) {
          P out;
#pragma unroll
          for (int e = 0; e < V; ++e) out.v[e] = from_f32<T>(acc[u][e]);
          d[p] = out;
        }
      }
    }
  }
};

}  // namespace sdk
