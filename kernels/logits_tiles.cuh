// logits_tiles.cuh: 64x64 tiles of logits q kᵀ (unscaled) for similarity.cu and
// info_nce_fused.cu, computed by the FMA tile GEMM (float) or on tensor cores (__half,
// __nv_bfloat16: kTensorCores), read at the FMA GEMM's thread mapping (gemm_row(i),
// gemm_col(j)) either way. Both kernels take the same path per type and scale by tile_logit,
// so the fused kernels recompute exactly the logits similarity_{T} stores.
#pragma once

#include "tile_gemm.cuh"
#include "tile_mma.cuh"

namespace ccpl {

// Tensor cores for the 16-bit types: __half on every architecture built (sm_75 on), and
// __nv_bfloat16 from sm_80, its first with bf16 WMMA; on sm_75 bf16 takes the FMA tile.
template <typename T>
constexpr bool kTensorCores = std::is_same<T, __half>::value ||
                              (std::is_same<T, __nv_bfloat16>::value && CCPL_ARCH >= 800);

// The logits tiles of a block, one at a time.
template <typename T, bool kMma = kTensorCores<T>> struct LogitsTiles;

template <typename T> struct LogitsTiles<T, false> {
    GemmShared& smem;
    GemmAcc acc;
    // The tile a[a0.., :] . b[b0.., :], unscaled.
    __device__ __forceinline__ void compute(const T* a, const T* b, int64_t S, int64_t C,
                                            int64_t a0, int64_t b0) {
#pragma unroll
        for (int i = 0; i < Gemm::kMicro; ++i)
#pragma unroll
            for (int j = 0; j < Gemm::kMicro; ++j) acc[i][j] = 0.0f;
        gemm_row_products(smem, a, b, S, C, a0, b0, acc);
    }
    __device__ __forceinline__ float at(int i, int j) const { return acc[i][j]; }
    // Done reading this tile.
    __device__ __forceinline__ void release() {}
};

template <typename T> struct LogitsTiles<T, true> {
    MmaStage<T>& stage;
    MmaTile& tile;
    __device__ __forceinline__ void compute(const T* a, const T* b, int64_t S, int64_t C,
                                            int64_t a0, int64_t b0) {
        mma_row_products(stage, tile, a, b, S, C, a0, b0);
        __syncthreads();  // the tile, stored by every warp
    }
    __device__ __forceinline__ float at(int i, int j) const { return tile[gemm_row(i)][gemm_col(j)]; }
    __device__ __forceinline__ void release() { __syncthreads(); }  // before the next store
};

// The logit of an unscaled dot product of a tile: rounded on its own (__fmul_rn), so that
// the fused kernels form the bits similarity_{T} stores. A plain product would be fused by
// nvcc into the add or subtraction that uses it (dot * inv_tau - lse as one FMA).
__device__ __forceinline__ float tile_logit(float dot, float inv_tau) { return __fmul_rn(dot, inv_tau); }

// Calls body(tiles) with the block's logits tiles for T over their shared memory.
template <typename T, typename Body> __device__ __forceinline__ void with_logits_tiles(const Body& body) {
    if constexpr (kTensorCores<T>) {
        __shared__ MmaStage<T> stage;
        __shared__ MmaTile tile;
        LogitsTiles<T> tiles{stage, tile};
        body(tiles);
    } else {
        __shared__ GemmShared smem;
        LogitsTiles<T> tiles{smem, {}};
        body(tiles);
    }
}

}  // namespace ccpl
