// RMSNorm forward and backward. One block per row (forward) or per range of rows (backward); each
// thread keeps ITEMS vectors of VEC elements of the row in registers, so x is read once per pass.
// Accumulation is fp32. The backward's dW work exists only in the WEIGHT_GRAD instantiation: a frozen
// weight gets a kernel with no accumulators, no partial buffer and no reduction.
#include "common.cuh"

namespace kpro {
namespace {

// Blocks of up to 1024 threads, so at most 64 registers a thread (benchmarks/RESULTS.md lists what ptxas
// reports for each instantiation).
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

// The backward keeps each row's x and dy as raw packed vectors (8 bf16 in 4 registers) rather than fp32,
// and recomputes x_hat and g in its second pass. Where a thread holds at most one 16-byte vector of a row
// (bf16 rows up to 8192, fp32 up to 4096), that frees the registers to load row r + 1 before row r's
// block reduction, so the reduction's latency overlaps the next row's loads; wider rows would spill under
// the 64-register cap of 1024-thread blocks, and load each row after the previous one's reduction. dW is
// accumulated per block in fp32 and written once, as one row of dw_partial.
template <typename T, int VEC, int ITEMS, bool WEIGHT_GRAD>
__global__ void __launch_bounds__(1024) rms_norm_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                         const T* __restrict__ weight, const float* __restrict__ rstd,
                                         T* __restrict__ dx, float* __restrict__ dw_partial, int64_t n_rows,
                                         int64_t n_cols, int64_t rows_per_block, int64_t dy_stride,
                                         int64_t x_stride, int64_t dx_stride) {
  using P = Pack<T, VEC>;
  constexpr bool kPrefetch = VEC > 1 && ITEMS * VEC * sizeof(T) <= 16;
  __shared__ float scratch[33];
  const int64_t first = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t last = min(first + rows_per_block, n_rows);
  if (first >= last) return;
  P w[ITEMS], x_now[ITEMS], dy_now[ITEMS];
  float dw[ITEMS][VEC];
  auto column = [&](int i) { return (static_cast<int64_t>(i) * blockDim.x + threadIdx.x) * VEC; };
  constexpr bool kWeightInRegisters = kPrefetch || VEC == 1;
  auto weight_at = [&](int i) -> P {
    return kWeightInRegisters ? w[i] : *reinterpret_cast<const P*>(weight + column(i));
  };
  auto load_row = [&](int64_t row, P (&xs)[ITEMS], P (&dys)[ITEMS]) {
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (column(i) < n_cols) {
        xs[i] = *reinterpret_cast<const P*>(x + row * x_stride + column(i));
        dys[i] = *reinterpret_cast<const P*>(dy + row * dy_stride + column(i));
      }
    }
  };
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    if (kWeightInRegisters && column(i) < n_cols) w[i] = *reinterpret_cast<const P*>(weight + column(i));
#pragma unroll
    for (int k = 0; k < VEC; ++k) dw[i][k] = 0.f;
  }
  load_row(first, x_now, dy_now);
  float r = rstd[first];
  for (int64_t row = first; row < last; ++row) {
    float dot = 0.f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (column(i) < n_cols) {
        const P w_i = weight_at(i);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float x_hat = Convert<T>::to_float(x_now[i].v[k]) * r;
          const float dy_k = Convert<T>::to_float(dy_now[i].v[k]);
          dot += dy_k * Convert<T>::to_float(w_i.v[k]) * x_hat;
          if (WEIGHT_GRAD) dw[i][k] += dy_k * x_hat;
        }
      }
    }
    P x_next[ITEMS], dy_next[ITEMS];  // row + 1, in flight during this row's reduction where kPrefetch
    float r_next = 0.f;
    if (kPrefetch && row + 1 < last) {
      load_row(row + 1, x_next, dy_next);
      r_next = rstd[row + 1];
    }
    const float mean_gx = block_sum(dot, scratch) / static_cast<float>(n_cols);
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (column(i) < n_cols) {
        const P w_i = weight_at(i);
        float out[VEC];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float x_hat = Convert<T>::to_float(x_now[i].v[k]) * r;
          out[k] = r * (Convert<T>::to_float(dy_now[i].v[k]) * Convert<T>::to_float(w_i.v[k]) - x_hat * mean_gx);
        }
        store_floats<T, VEC>(dx + row * dx_stride + column(i), out);
        if (kPrefetch) {
          x_now[i] = x_next[i];
          dy_now[i] = dy_next[i];
        }
      }
    }
    if (kPrefetch) {
      r = r_next;
    } else if (row + 1 < last) {
      load_row(row + 1, x_now, dy_now);
      r = rstd[row + 1];
    }
  }
  if (WEIGHT_GRAD) {
    float* partial = dw_partial + static_cast<int64_t>(blockIdx.x) * n_cols;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (column(i) < n_cols) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) partial[column(i) + k] = dw[i][k];
      }
    }
  }
}

// dW = the column sums of the blocks' fp32 partial rows, cast to the weight's dtype: one pass, one launch.
template <typename T>
__global__ void rms_norm_dw_kernel(const float* __restrict__ dw_partial, T* __restrict__ dw, int64_t parts,
                                   int64_t n_cols) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= n_cols) return;
  float sum = 0.f;
  for (int64_t part = 0; part < parts; ++part) sum += dw_partial[part * n_cols + col];
  dw[col] = Convert<T>::from_float(sum);
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

// dw == nullptr means the weight is frozen: no dW work at all. Otherwise dw_partial is a
// [ceil(n_rows / rows_per_block), n_cols] fp32 scratch buffer, and dw (n_cols, x's dtype) receives its column sums.
extern "C" int kpro_rms_norm_backward(int dtype, const void* dy, const void* x, const void* weight,
                                      const float* rstd, void* dx, float* dw_partial, void* dw, int64_t n_rows,
                                      int64_t n_cols, int64_t rows_per_block, int64_t dy_stride, int64_t x_stride,
                                      int64_t dx_stride, void* stream) {
  if (n_rows == 0) return 0;
  if (rows_per_block < 1 || (dw != nullptr && dw_partial == nullptr)) return static_cast<int>(cudaErrorInvalidValue);
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
        if (dw != nullptr) {
          rms_norm_backward_kernel<T, VEC, ITEMS, true><<<blocks, threads, 0, s>>>(
              dy_t, x_t, w_t, rstd, static_cast<T*>(dx), dw_partial, n_rows, n_cols, rows_per_block, dy_stride,
              x_stride, dx_stride);
          rms_norm_dw_kernel<T><<<(n_cols + 255) / 256, 256, 0, s>>>(dw_partial, static_cast<T*>(dw), blocks, n_cols);
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
