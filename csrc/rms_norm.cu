// RMSNorm forward and backward. One block per row (forward) or per range of rows (backward); each
// thread keeps ITEMS vectors of VEC elements of the row in registers, so x is read once per pass.
// Accumulation is fp32. The backward's dW work exists only in the WEIGHT_GRAD instantiation: a frozen
// weight gets a kernel with no accumulators, no partial buffer and no reduction.
#include "common.cuh"

namespace kpro {
namespace {

// Blocks of up to 1024 threads, so at most 64 registers a thread. ptxas -v (sm_80) reports no spills in
// the forward; the backward, which keeps w, dW, x_hat and g per item, spills in its widest instantiations
// (16-byte vectors: 52 B at 2 items with dW for bf16/fp16, 200 B at 4 for fp32; one-element fallback up
// to 292 B). Not yet timed on a GPU: fewer registers per item is the first thing to try there.
template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(1024) rms_norm_forward_kernel(const T* __restrict__ x, const T* __restrict__ weight, T* __restrict__ y,
                                        float* __restrict__ rstd_out, int64_t n_cols, int64_t x_stride,
                                        int64_t y_stride, float eps) {
  __shared__ float scratch[33];
  const int64_t row = blockIdx.x;
  const T* x_row = x + row * x_stride;
  float xs[ITEMS][VEC];
  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t col = (static_cast<int64_t>(i) * blockDim.x + threadIdx.x) * VEC;
    if (col < n_cols) {
      load_floats<T, VEC>(x_row + col, xs[i]);
#pragma unroll
      for (int k = 0; k < VEC; ++k) sum_sq += xs[i][k] * xs[i][k];
    }
  }
  const float rstd = rsqrtf(block_sum(sum_sq, scratch) / static_cast<float>(n_cols) + eps);
  T* y_row = y + row * y_stride;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t col = (static_cast<int64_t>(i) * blockDim.x + threadIdx.x) * VEC;
    if (col < n_cols) {
      float w[VEC], out[VEC];
      load_floats<T, VEC>(weight + col, w);
#pragma unroll
      for (int k = 0; k < VEC; ++k) out[k] = xs[i][k] * rstd * w[k];
      store_floats<T, VEC>(y_row + col, out);
    }
  }
  if (threadIdx.x == 0) rstd_out[row] = rstd;
}

template <typename T, int VEC, int ITEMS, bool WEIGHT_GRAD>
__global__ void __launch_bounds__(1024) rms_norm_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                         const T* __restrict__ weight, const float* __restrict__ rstd,
                                         T* __restrict__ dx, float* __restrict__ dw_partial, int64_t n_rows,
                                         int64_t n_cols, int64_t rows_per_block, int64_t dy_stride,
                                         int64_t x_stride, int64_t dx_stride) {
  __shared__ float scratch[33];
  const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t last = min(first + rows_per_block, n_rows);
  float w[ITEMS][VEC], dw[ITEMS][VEC];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int64_t col = (static_cast<int64_t>(i) * blockDim.x + threadIdx.x) * VEC;
    if (col < n_cols) load_floats<T, VEC>(weight + col, w[i]);
#pragma unroll
    for (int k = 0; k < VEC; ++k) dw[i][k] = 0.f;
  }
  for (int64_t row = first; row < last; ++row) {
    const float r = rstd[row];
    float x_hat[ITEMS][VEC], g[ITEMS][VEC];
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t col = (static_cast<int64_t>(i) * blockDim.x + threadIdx.x) * VEC;
      if (col < n_cols) {
        float dy_v[VEC];
        load_floats<T, VEC>(x + row * x_stride + col, x_hat[i]);
        load_floats<T, VEC>(dy + row * dy_stride + col, dy_v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          x_hat[i][k] *= r;
          g[i][k] = dy_v[k] * w[i][k];
          dot += g[i][k] * x_hat[i][k];
          if (WEIGHT_GRAD) dw[i][k] += dy_v[k] * x_hat[i][k];
        }
      }
    }
    const float mean_gx = block_sum(dot, scratch) / static_cast<float>(n_cols);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t col = (static_cast<int64_t>(i) * blockDim.x + threadIdx.x) * VEC;
      if (col < n_cols) {
        float out[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) out[k] = r * (g[i][k] - x_hat[i][k] * mean_gx);
        store_floats<T, VEC>(dx + row * dx_stride + col, out);
      }
    }
  }
  if (WEIGHT_GRAD) {
    float* partial = dw_partial + static_cast<int64_t>(blockIdx.x) * n_cols;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int64_t col = (static_cast<int64_t>(i) * blockDim.x + threadIdx.x) * VEC;
      if (col < n_cols) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) partial[col + k] = dw[i][k];
      }
    }
  }
}

// Calls f(integral_constant<ITEMS>) with the fewest items per thread that cover n_cols with at most
// 1024 threads, keeping ITEMS * VEC <= 16 elements in registers per array.
template <int VEC, typename F> int with_items(int64_t n_cols, F&& f) {
  if (n_cols <= 1024 * VEC) return f(std::integral_constant<int, 1>{});
  if constexpr (2 * VEC <= 16) if (n_cols <= 2048 * VEC) return f(std::integral_constant<int, 2>{});
  if constexpr (4 * VEC <= 16) if (n_cols <= 4096 * VEC) return f(std::integral_constant<int, 4>{});
  if constexpr (8 * VEC <= 16) if (n_cols <= 8192 * VEC) return f(std::integral_constant<int, 8>{});
  if constexpr (16 * VEC <= 16) if (n_cols <= 16384 * VEC) return f(std::integral_constant<int, 16>{});
  return static_cast<int>(cudaErrorInvalidValue);
}

// Calls f(integral_constant<VEC>) with 16-byte vectors when layout allows, else single elements.
template <typename T, typename F> int with_vector(int vec, F&& f) {
  if (vec == 16 / static_cast<int>(sizeof(T))) return f(std::integral_constant<int, 16 / sizeof(T)>{});
  return f(std::integral_constant<int, 1>{});
}

}  // namespace
}  // namespace kpro

using namespace kpro;

extern "C" int kpro_rms_norm_forward(int dtype, const void* x, const void* weight, void* y, float* rstd,
                                     int64_t n_rows, int64_t n_cols, int64_t x_stride, int64_t y_stride, float eps,
                                     void* stream) {
  if (n_rows == 0) return 0;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int vec = vector_width<T>(n_cols, {x, weight, y}, {x_stride, y_stride});
    return with_vector<T>(vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      return with_items<VEC>(n_cols, [&](auto items_c) {
        constexpr int ITEMS = decltype(items_c)::value;
        const int threads = round_up_to_warp((n_cols + VEC * ITEMS - 1) / (VEC * ITEMS));
        rms_norm_forward_kernel<T, VEC, ITEMS><<<n_rows, threads, 0, static_cast<cudaStream_t>(stream)>>>(
            static_cast<const T*>(x), static_cast<const T*>(weight), static_cast<T*>(y), rstd, n_cols, x_stride,
            y_stride, eps);
        return static_cast<int>(cudaGetLastError());
      });
    });
  });
}

// dw_partial == nullptr means the weight is frozen: no dW work at all. Otherwise it is a
// [ceil(n_rows / rows_per_block), n_cols] fp32 buffer that the caller sums over its first dimension.
extern "C" int kpro_rms_norm_backward(int dtype, const void* dy, const void* x, const void* weight,
                                      const float* rstd, void* dx, float* dw_partial, int64_t n_rows,
                                      int64_t n_cols, int64_t rows_per_block, int64_t dy_stride, int64_t x_stride,
                                      int64_t dx_stride, void* stream) {
  if (n_rows == 0) return 0;
  if (rows_per_block < 1) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t blocks = (n_rows + rows_per_block - 1) / rows_per_block;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int vec = vector_width<T>(n_cols, {dy, x, weight, dx}, {dy_stride, x_stride, dx_stride});
    return with_vector<T>(vec, [&](auto vec_c) {
      constexpr int VEC = decltype(vec_c)::value;
      return with_items<VEC>(n_cols, [&](auto items_c) {
        constexpr int ITEMS = decltype(items_c)::value;
        const int threads = round_up_to_warp((n_cols + VEC * ITEMS - 1) / (VEC * ITEMS));
        auto s = static_cast<cudaStream_t>(stream);
        const T *dy_t = static_cast<const T*>(dy), *x_t = static_cast<const T*>(x), *w_t = static_cast<const T*>(weight);
        if (dw_partial != nullptr) {
          rms_norm_backward_kernel<T, VEC, ITEMS, true><<<blocks, threads, 0, s>>>(
              dy_t, x_t, w_t, rstd, static_cast<T*>(dx), dw_partial, n_rows, n_cols, rows_per_block, dy_stride,
              x_stride, dx_stride);
        } else {
          rms_norm_backward_kernel<T, VEC, ITEMS, false><<<blocks, threads, 0, s>>>(
              dy_t, x_t, w_t, rstd, static_cast<T*>(dx), nullptr, n_rows, n_cols, rows_per_block, dy_stride,
              x_stride, dx_stride);
        }
        return static_cast<int>(cudaGetLastError());
      });
    });
  });
}
