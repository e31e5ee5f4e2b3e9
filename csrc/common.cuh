// Shared pieces of kpro's CUDA kernels: dtype conversion, 16-byte vector loads/stores, block reductions.
// Plain CUDA C++: no torch headers, so the library compiles with nvcc on any machine.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

namespace kpro {

// dtype codes shared with kpro/ops/cuda_kernels/library.py
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

template <typename T> struct Convert;
template <> struct Convert<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};
template <> struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Convert<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

// VEC elements of T loaded or stored in one instruction (16 bytes when VEC = 16 / sizeof(T)).
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };

template <typename T, int VEC>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = Convert<T>::to_float(pack.v[k]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int k = 0; k < VEC; ++k) pack.v[k] = Convert<T>::from_float(in[k]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of v over the whole block, returned to every thread. `scratch` is 33 floats of shared memory;
// blockDim.x must be a multiple of 32.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float total = lane < warps ? scratch[lane] : 0.f;
    total = warp_sum(total);
    if (lane == 0) scratch[32] = total;
  }
  __syncthreads();
  const float total = scratch[32];
  __syncthreads();  // the next call may overwrite scratch
  return total;
}

// Widest vector usable for every pointer and row stride given: 16 bytes, or one element.
template <typename T>
inline int vector_width(int64_t n_cols, std::initializer_list<const void*> pointers,
                        std::initializer_list<int64_t> strides) {
  constexpr int wide = 16 / sizeof(T);
  if (n_cols % wide) return 1;
  for (const void* p : pointers)
    if (reinterpret_cast<uintptr_t>(p) % 16) return 1;
  for (int64_t s : strides)
    if (s % wide) return 1;
  return wide;
}

inline int round_up_to_warp(int64_t n) { return static_cast<int>((n + 31) / 32 * 32); }

// Runs f(tag) with tag a value of the element type for `dtype` (float, __nv_bfloat16, __half).
template <typename F> inline int dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: return f(float{});
    case kBFloat16: return f(__nv_bfloat16{});
    case kFloat16: return f(__half{});
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

}  // namespace kpro
