// tile_gemm.cuh: the shared-memory tile loop of similarity.cu (logits = q kᵀ), info_nce.cu
// (gradients = G · rows) and info_nce_fused.cu (both, tile by tile): one block computes one
// 64x64 tile of out = A·B with float accumulation. The operands come from callbacks, so the
// same loop serves plain rows, transposed reads and operands computed on the fly. Its sibling
// for the 16-row blocks of small_s.cu is split_gemm.cuh.
#pragma once

#include "common.cuh"

namespace ccpl {

// The FMA tile of kTileSide x kTileSide (common.cuh) over kTileThreads threads.
struct Gemm {
    static constexpr int kSide = 16;                  // threads per tile side
    static constexpr int kMicro = kTileSide / kSide;  // each thread: kMicro x kMicro
    static constexpr int kStep = 32;                  // reduction depth per stage
    static constexpr int kStride = kTileSide + 1;     // padded: conflict-free stores
};
static_assert(Gemm::kSide * Gemm::kSide == kTileThreads, "one thread per micro-tile");
static_assert(Gemm::kMicro * Gemm::kSide == kTileSide, "micro-tiles cover the tile");

// Both operand tiles of one stage, reduction-index major: a[kk][m], b[kk][n].
struct GemmShared {
    float a[Gemm::kStep][Gemm::kStride];
    float b[Gemm::kStep][Gemm::kStride];
};

// Accumulators of one thread: rows ty + kSide*i, columns tx + kSide*j of the tile (strided,
// so a warp reads shared memory without bank conflicts and stores runs of 16 columns).
using GemmAcc = float[Gemm::kMicro][Gemm::kMicro];

__device__ __forceinline__ int gemm_row(int i) { return (int)threadIdx.x / Gemm::kSide + Gemm::kSide * i; }
__device__ __forceinline__ int gemm_col(int j) { return (int)threadIdx.x % Gemm::kSide + Gemm::kSide * j; }

// Stores this thread's elements of the tile at (r0, c0) of the row-major rows x cols matrix
// `out`: value(i, j) for accumulator [i][j], the elements past the matrix's edges skipped
// (value is not called for them).
template <typename Out, typename Value>
__device__ __forceinline__ void gemm_store(Out* __restrict__ out, int64_t rows, int64_t cols, int64_t r0,
                                           int64_t c0, const Value& value) {
#pragma unroll
    for (int i = 0; i < Gemm::kMicro; ++i) {
        const int64_t row = r0 + gemm_row(i);
#pragma unroll
        for (int j = 0; j < Gemm::kMicro; ++j) {
            const int64_t col = c0 + gemm_col(j);
            if (row < rows && col < cols) out[row * cols + col] = value(i, j);
        }
    }
}

// tile[kk][m] = load(m, kk) for the whole stage. `kAlongK` says which index is contiguous in
// global memory: consecutive threads take consecutive kk (true) or consecutive m (false), so
// the global reads coalesce either way; the padded stride keeps the stores conflict-free.
template <bool kAlongK, typename Load>
__device__ __forceinline__ void gemm_fill(float (*tile)[Gemm::kStride], const Load& load) {
#pragma unroll
    for (int e = threadIdx.x; e < kTileSide * Gemm::kStep; e += kTileThreads) {
        const int m = kAlongK ? e / Gemm::kStep : e % kTileSide;
        const int kk = kAlongK ? e % Gemm::kStep : e / kTileSide;
        tile[kk][m] = load(m, kk);
    }
}

// acc += A·B over k in [0, depth) for the block's tile. load_a(m, k) is A at tile row m and
// absolute k, load_b(k, n) is B at absolute k and tile column n; both return 0 outside the
// matrices, so no size needs to be a multiple of the tile. Every thread of the block calls
// this (it has barriers). kStaged sums each stage's kStep products apart before adding them
// to acc: for long reductions (the backward sums over S, up to 65536) the float error then
// grows with depth/kStep + kStep terms instead of depth (measured at S = 8192: 6e-7 instead
// of 3e-6), for 16 more registers.
template <bool kAAlongK, bool kBAlongK, bool kStaged, typename LoadA, typename LoadB>
__device__ __forceinline__ void gemm_tile(GemmShared& smem, int64_t depth, const LoadA& load_a,
                                          const LoadB& load_b, GemmAcc& acc) {
    for (int64_t k0 = 0; k0 < depth; k0 += Gemm::kStep) {
        gemm_fill<kAAlongK>(smem.a, [&](int m, int kk) { return load_a(m, k0 + kk); });
        gemm_fill<kBAlongK>(smem.b, [&](int n, int kk) { return load_b(k0 + kk, n); });
        __syncthreads();
        GemmAcc stage = {};
        GemmAcc& sum = kStaged ? stage : acc;
#pragma unroll
        for (int kk = 0; kk < Gemm::kStep; ++kk) {
            float a[Gemm::kMicro], b[Gemm::kMicro];
#pragma unroll
            for (int i = 0; i < Gemm::kMicro; ++i) a[i] = smem.a[kk][gemm_row(i)];
#pragma unroll
            for (int j = 0; j < Gemm::kMicro; ++j) b[j] = smem.b[kk][gemm_col(j)];
#pragma unroll
            for (int i = 0; i < Gemm::kMicro; ++i)
#pragma unroll
                for (int j = 0; j < Gemm::kMicro; ++j) sum[i][j] = fmaf(a[i], b[j], sum[i][j]);
        }
        if (kStaged) {
#pragma unroll
            for (int i = 0; i < Gemm::kMicro; ++i)
#pragma unroll
                for (int j = 0; j < Gemm::kMicro; ++j) acc[i][j] += stage[i][j];
        }
        __syncthreads();
    }
}

// acc[m][n] += a[a0 + m, :] . b[b0 + n, :] over the C columns of two row matrices (S, C) of
// storage type T: a 64x64 tile of a bᵀ. Rows past S count as zeros. The reduction order is
// fixed and fmaf is commutative, so the tile of a bᵀ at (a0, b0) and that of b aᵀ at (b0, a0)
// hold the same bits, transposed: the fused kernels recompute the logits the similarity
// kernel stores, exactly.
template <typename T>
__device__ __forceinline__ void gemm_row_products(GemmShared& smem, const T* __restrict__ a,
                                                  const T* __restrict__ b, int64_t S, int64_t C,
                                                  int64_t a0, int64_t b0, GemmAcc& acc) {
    const auto load_a = [&](int m, int64_t c) {
        const int64_t i = a0 + m;
        return i < S && c < C ? to_float(a[i * C + c]) : 0.0f;
    };
    const auto load_b = [&](int64_t c, int n) {
        const int64_t j = b0 + n;
        return j < S && c < C ? to_float(b[j * C + c]) : 0.0f;
    };
    gemm_tile<true, true, false>(smem, C, load_a, load_b, acc);  // C: a short reduction
}

}  // namespace ccpl
