// SwiGLU forward and backward, elementwise over [rows, cols] with a row stride per tensor, so the
// separate and the packed (gate and up as two halves of one row) layouts share the kernels.
// 16-byte vectors where the layout allows; fp32 math; silu recomputed in the backward.
#include "common.cuh"

namespace kpro {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float sigmoid(float v) { return 1.f / (1.f + expf(-v)); }

template <typename T, int VEC>
__global__ void swiglu_forward_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ y,
                                      int64_t n_rows, int64_t n_cols, int64_t g_stride, int64_t u_stride,
                                      int64_t y_stride) {
  const int64_t vectors_per_row = n_cols / VEC, total = n_rows * vectors_per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / vectors_per_row, col = (i - row * vectors_per_row) * VEC;
    float g[VEC], u[VEC], out[VEC];
    load_floats<T, VEC>(gate + row * g_stride + col, g);
    load_floats<T, VEC>(up + row * u_stride + col, u);
#pragma unroll
    for (int k = 0; k < VEC; ++k) out[k] = g[k] * sigmoid(g[k]) * u[k];
    store_floats<T, VEC>(y + row * y_stride + col, out);
  }
}

template <typename T, int VEC>
__global__ void swiglu_backward_kernel(const T* __restrict__ dy, const T* __restrict__ gate,
                                       const T* __restrict__ up, T* __restrict__ dgate, T* __restrict__ dup,
                                       int64_t n_rows, int64_t n_cols, int64_t dy_stride, int64_t g_stride,
                                       int64_t u_stride, int64_t dg_stride, int64_t du_stride) {
  const int64_t vectors_per_row = n_cols / VEC, total = n_rows * vectors_per_row;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / vectors_per_row, col = (i - row * vectors_per_row) * VEC;
    float d[VEC], g[VEC], u[VEC], dg[VEC], du[VEC];
    load_floats<T, VEC>(dy + row * dy_stride + col, d);
    load_floats<T, VEC>(gate + row * g_stride + col, g);
    load_floats<T, VEC>(up + row * u_stride + col, u);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float s = sigmoid(g[k]);
      dg[k] = d[k] * u[k] * s * (1.f + g[k] * (1.f - s));
      du[k] = d[k] * g[k] * s;
    }
    store_floats<T, VEC>(dgate + row * dg_stride + col, dg);
    store_floats<T, VEC>(dup + row * du_stride + col, du);
  }
}

inline unsigned blocks_for(int64_t work) {
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < (1 << 20) ? blocks : (1 << 20));  // grid-stride beyond that
}

}  // namespace
}  // namespace kpro

using namespace kpro;

extern "C" int kpro_swiglu_forward(int dtype, const void* gate, const void* up, void* y, int64_t n_rows,
                                   int64_t n_cols, int64_t g_stride, int64_t u_stride, int64_t y_stride,
                                   void* stream) {
  if (n_rows == 0 || n_cols == 0) return 0;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto s = static_cast<cudaStream_t>(stream);
    const auto g = static_cast<const T*>(gate), u = static_cast<const T*>(up);
    constexpr int wide = 16 / sizeof(T);
    if (vector_width<T>(n_cols, {gate, up, y}, {g_stride, u_stride, y_stride}) == wide) {
      swiglu_forward_kernel<T, wide><<<blocks_for(n_rows * n_cols / wide), kThreads, 0, s>>>(
          g, u, static_cast<T*>(y), n_rows, n_cols, g_stride, u_stride, y_stride);
    } else {
      swiglu_forward_kernel<T, 1><<<blocks_for(n_rows * n_cols), kThreads, 0, s>>>(
          g, u, static_cast<T*>(y), n_rows, n_cols, g_stride, u_stride, y_stride);
    }
    return static_cast<int>(cudaGetLastError());
  });
}

extern "C" int kpro_swiglu_backward(int dtype, const void* dy, const void* gate, const void* up, void* dgate,
                                    void* dup, int64_t n_rows, int64_t n_cols, int64_t dy_stride, int64_t g_stride,
                                    int64_t u_stride, int64_t dg_stride, int64_t du_stride, void* stream) {
  if (n_rows == 0 || n_cols == 0) return 0;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto s = static_cast<cudaStream_t>(stream);
    const auto d = static_cast<const T*>(dy), g = static_cast<const T*>(gate), u = static_cast<const T*>(up);
    constexpr int wide = 16 / sizeof(T);
    if (vector_width<T>(n_cols, {dy, gate, up, dgate, dup}, {dy_stride, g_stride, u_stride, dg_stride, du_stride}) == wide) {
      swiglu_backward_kernel<T, wide><<<blocks_for(n_rows * n_cols / wide), kThreads, 0, s>>>(
          d, g, u, static_cast<T*>(dgate), static_cast<T*>(dup), n_rows, n_cols, dy_stride, g_stride, u_stride,
          dg_stride, du_stride);
    } else {
      swiglu_backward_kernel<T, 1><<<blocks_for(n_rows * n_cols), kThreads, 0, s>>>(
          d, g, u, static_cast<T*>(dgate), static_cast<T*>(dup), n_rows, n_cols, dy_stride, g_stride, u_stride,
          dg_stride, du_stride);
    }
    return static_cast<int>(cudaGetLastError());
  });
}
