// tile_mma.cuh: the tensor-core tile GEMMs of info_nce_fused.cu for 16-bit storage types
// (__half, __nv_bfloat16): WMMA m16n16k16 with float accumulators (bf16 from sm_80 only:
// kTensorCores of logits_tiles.cuh). A block of 8 warps computes a 64x64 float tile; warp w
// owns the 16-row band w/2 and two 16-column blocks of it. The operands are staged in shared memory in T,
// the results stored to a float tile in shared memory, so the callers read them with any
// thread mapping (fragment layouts are never relied on). The emulator runs the same code
// through the portable nvcuda::wmma of emu/runtime/cuda_emu.h.
#pragma once

#include "common.cuh"
#ifdef __CUDACC__
#include <mma.h>
#endif

namespace ccpl {

namespace wmma = nvcuda::wmma;

// The tensor-core tile of kTileSide x kTileSide (common.cuh) over kTileThreads threads.
struct Mma {
    static constexpr int kFrag = 16;   // m = n = k of one mma
    static constexpr int kDepth = 32;  // reduction depth staged per step
    // Padded leading dimensions: multiples of 8 elements (16 bytes) as WMMA requires, and
    // every 16-row band starts 32-byte aligned.
    static constexpr int kStageLd = kDepth + 8;    // T
    static constexpr int kTileLd = kTileSide + 8;  // T
    static constexpr int kAccLd = kTileSide + 4;   // float
    static constexpr int kBlocksPerWarp = 2;       // 16x16 output blocks of a warp
};
static_assert(kTileSide / Mma::kFrag * (kTileSide / Mma::kFrag) ==
                  Mma::kBlocksPerWarp * kTileThreads / kWarp,
              "the 8 warps cover the 64x64 tile");

// The warp's 16-row band and its first 16-column block.
__device__ __forceinline__ int mma_band() { return (int)threadIdx.x / kWarp / 2 * Mma::kFrag; }
__device__ __forceinline__ int mma_column(int f) {
    return ((int)threadIdx.x / kWarp % 2 * Mma::kBlocksPerWarp + f) * Mma::kFrag;
}

using MmaAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// Tensor cores add with truncation: each block of products is aligned to its largest term and
// the bits below cut off, every term toward zero, and the sum rounded toward zero (emu/runtime/
// hmma.h). Chained over a long reduction in one accumulator, the bias grows with its length
// (about 2.5 float ulps of the accumulator per block: -2.3e-5 relative at K = 4096 on sm_90).
// So every stage accumulates into fresh fragments, added to the running float sums here: the
// truncation stays relative to one stage, and the stages add with float rounding, unbiased.
__device__ __forceinline__ void mma_add_stage(MmaAcc (&sum)[Mma::kBlocksPerWarp],
                                              const MmaAcc (&stage)[Mma::kBlocksPerWarp]) {
#pragma unroll
    for (int f = 0; f < Mma::kBlocksPerWarp; ++f)
#pragma unroll
        for (int e = 0; e < MmaAcc::num_elements; ++e) sum[f].x[e] += stage[f].x[e];
}
template <typename T>
using MmaA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;

// The 64x64 float result tile, row-major. Its type carries the 32-byte alignment WMMA
// stores need, so every declaration of one (shared, or a member) has it.
using MmaTile __align__(32) = float[kTileSide][Mma::kAccLd];
static_assert(alignof(MmaTile) == 32, "WMMA operands are 32-byte aligned");

// Operand tiles of one stage of the logits product: rows m of a and rows n of b, kDepth
// columns of C each.
template <typename T> struct MmaStage {
    __align__(32) T a[kTileSide][Mma::kStageLd];
    __align__(32) T b[kTileSide][Mma::kStageLd];
};

// tile[m][kk] = rows[row0 + m][c0 + kk] of a row matrix (S, C), zero outside it; consecutive
// threads read consecutive columns.
template <typename T>
__device__ __forceinline__ void mma_fill_rows(T (*tile)[Mma::kStageLd], const T* __restrict__ rows,
                                              int64_t S, int64_t C, int64_t row0, int64_t c0) {
    for (int e = threadIdx.x; e < kTileSide * Mma::kDepth; e += kTileThreads) {
        const int m = e / Mma::kDepth, kk = e % Mma::kDepth;
        const int64_t r = row0 + m, c = c0 + kk;
        tile[m][kk] = r < S && c < C ? rows[r * C + c] : from_float<T>(0.0f);
    }
}

// out[m][n] = a[a0 + m, :] . b[b0 + n, :] over the C columns of two row matrices (S, C) in T,
// rows past S as zeros (a bᵀ, as gemm_row_products, on tensor cores). Every thread of the
// block calls this; `out` is complete after the caller's next barrier.
template <typename T>
__device__ void mma_row_products(MmaStage<T>& stage, MmaTile& out, const T* __restrict__ a,
                                 const T* __restrict__ b, int64_t S, int64_t C, int64_t a0,
                                 int64_t b0) {
    MmaAcc acc[Mma::kBlocksPerWarp];
#pragma unroll
    for (int f = 0; f < Mma::kBlocksPerWarp; ++f) wmma::fill_fragment(acc[f], 0.0f);
    const int band = mma_band();
    for (int64_t c0 = 0; c0 < C; c0 += Mma::kDepth) {
        mma_fill_rows(stage.a, a, S, C, a0, c0);
        mma_fill_rows(stage.b, b, S, C, b0, c0);
        __syncthreads();
        MmaAcc part[Mma::kBlocksPerWarp];  // this stage's products (mma_add_stage)
#pragma unroll
        for (int f = 0; f < Mma::kBlocksPerWarp; ++f) wmma::fill_fragment(part[f], 0.0f);
#pragma unroll
        for (int kk = 0; kk < Mma::kDepth; kk += Mma::kFrag) {
            MmaA<T> fa;
            wmma::load_matrix_sync(fa, &stage.a[band][kk], Mma::kStageLd);
#pragma unroll
            for (int f = 0; f < Mma::kBlocksPerWarp; ++f) {
                // bᵀ: column n of B is row n of b, so B is b's tile read column-major.
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
                wmma::load_matrix_sync(fb, &stage.b[mma_column(f)][kk], Mma::kStageLd);
                wmma::mma_sync(part[f], fa, fb, part[f]);
            }
        }
        mma_add_stage(acc, part);
        __syncthreads();  // the next stage overwrites the operands
    }
#pragma unroll
    for (int f = 0; f < Mma::kBlocksPerWarp; ++f) {
        wmma::store_matrix_sync(&out[band][mma_column(f)], acc[f], Mma::kAccLd, wmma::mem_row_major);
    }
}

// acc += g · other for one 64-deep step: g (64x64, row-major in T) times other (64 rows of
// the reduction index by 64 output columns, row-major in T), summed in fresh fragments and
// added to acc in float (mma_add_stage: the backward's reduction runs over S). The warp's
// accumulators stay in registers across steps; every thread of the block calls this after a
// barrier that completed g and other.
template <typename T>
__device__ __forceinline__ void mma_accumulate(const T (*g)[Mma::kTileLd],
                                               const T (*other)[Mma::kTileLd],
                                               MmaAcc (&acc)[Mma::kBlocksPerWarp]) {
    const int band = mma_band();
    MmaAcc part[Mma::kBlocksPerWarp];
#pragma unroll
    for (int f = 0; f < Mma::kBlocksPerWarp; ++f) wmma::fill_fragment(part[f], 0.0f);
#pragma unroll
    for (int kk = 0; kk < kTileSide; kk += Mma::kFrag) {
        MmaA<T> fa;
        wmma::load_matrix_sync(fa, &g[band][kk], Mma::kTileLd);
#pragma unroll
        for (int f = 0; f < Mma::kBlocksPerWarp; ++f) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
            wmma::load_matrix_sync(fb, &other[kk][mma_column(f)], Mma::kTileLd);
            wmma::mma_sync(part[f], fa, fb, part[f]);
        }
    }
    mma_add_stage(acc, part);
}

// Stores the warp's accumulators into the float tile (complete after the caller's barrier).
__device__ __forceinline__ void mma_store(MmaTile& out, const MmaAcc (&acc)[Mma::kBlocksPerWarp]) {
#pragma unroll
    for (int f = 0; f < Mma::kBlocksPerWarp; ++f) {
        wmma::store_matrix_sync(&out[mma_band()][mma_column(f)], acc[f], Mma::kAccLd, wmma::mem_row_major);
    }
}

}  // namespace ccpl
