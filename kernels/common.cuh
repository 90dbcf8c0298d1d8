// common.cuh: what every kernel family shares. Storage-type loads and stores (float
// accumulation for half types), warp and block reductions, the neighbour convention, and the
// macros that turn one templated kernel into its per-dtype entry points.
//
// The same sources compile with nvcc (__CUDACC__) and, for the CPU emulator (the ccpl-emu
// crate), with the host C++ compiler against its cuda_emu.h, which provides the CUDA built-ins
// used here.
#pragma once

#include "ccpl.h"

#ifdef __CUDACC_RTC__
// NVRTC (the default build, build.rs) has no C++ standard library: the std names the kernels
// use (type traits) come from libcu++, and INFINITY, a macro of <math.h>, from its limits.
#include <cuda/std/limits>
#include <cuda/std/type_traits>
namespace std {
using namespace cuda::std;
}
#define INFINITY (::cuda::std::numeric_limits<float>::infinity())
#endif
#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
// One entry point: extern "C" so the symbol is the plain name `name`.
#define CCPL_KERNEL(name, Params) extern "C" __global__ void name(const Params p)
// Dynamic shared memory of the launch, viewed as an array of `type`.
#define CCPL_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#else
#include "cuda_emu.h"  // emu/runtime/, on the emulator's include path
#endif

// The compute capability the code is compiled for, times 10 (__CUDA_ARCH__: 750, 800, 900);
// the emulator defines it as the architecture it models (cuda_emu.h). nvcc's host pass
// generates no device code: any value parses there.
#ifdef __CUDA_ARCH__
#define CCPL_ARCH __CUDA_ARCH__
#elif !defined(CCPL_ARCH)
#define CCPL_ARCH 900
#endif

// The three storage types, each with its kernel-name suffix.
#define CCPL_KERNEL_T(op, Params, T, suffix) \
    CCPL_KERNEL(op##_##suffix, Params) { op<T>(p); }
#define CCPL_KERNELS_PER_DTYPE(op, Params)            \
    CCPL_KERNEL_T(op, Params, float, f32)             \
    CCPL_KERNEL_T(op, Params, __half, f16)            \
    CCPL_KERNEL_T(op, Params, __nv_bfloat16, bf16)

namespace ccpl {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;

// The tiled kernels' output tile (tile_gemm.cuh, tile_mma.cuh): its side and the threads of
// the block that computes it.
constexpr int kTileSide = CCPL_TILE_SIDE;
constexpr int kTileThreads = CCPL_TILE_THREADS;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

template <typename T> __device__ __forceinline__ const T* ptr(uint64_t addr) {
    return reinterpret_cast<const T*>(addr);
}
template <typename T> __device__ __forceinline__ T* mut_ptr(uint64_t addr) {
    return reinterpret_cast<T*>(addr);
}

// body(std::true_type{}) or body(std::false_type{}) as `flag` is set: a launch parameter
// turned into a template argument (`decltype(x)::value`), the one dispatch of every kernel
// with a transposed variant.
template <typename Body> __device__ __forceinline__ void bool_switch(int32_t flag, const Body& body) {
    if (flag) {
        body(std::true_type{});
    } else {
        body(std::false_type{});
    }
}

// Neighbour direction k (0..7) as (dh, dw), decoded from CCPL_NEIGHBOR_SLOTS (ccpl.h).
__device__ __forceinline__ int window_slot(int k) { return (CCPL_NEIGHBOR_SLOTS >> (4 * k)) & 0xF; }
__device__ __forceinline__ int neighbor_dh(int k) { return window_slot(k) / 3 - 1; }
__device__ __forceinline__ int neighbor_dw(int k) { return window_slot(k) % 3 - 1; }

// Sum over the warp (float, or double where a sum must not overflow); every lane gets it.
template <typename V> __device__ __forceinline__ V warp_sum(V v) {
    for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFullMask, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = kWarp / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 values of shared memory; the call begins and ends with a barrier, so
// back-to-back calls may reuse it.
template <typename V> __device__ __forceinline__ V block_sum(V v, V* scratch) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    const int warps = blockDim.x / kWarp;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

}  // namespace ccpl
