// split_gemm.cuh: the shared-memory tile loop of small_s.cu, whose blocks own 16 rows: one
// block computes one 16x64 tile of out = A·B with float accumulation, the reduction split
// among groups of threads so that every thread has work. As tile_gemm.cuh's, the operands come
// from callbacks.
#pragma once

#include "common.cuh"

namespace ccpl {

// The tile: kRows x kCols outputs over CCPL_SMALL_S_BLOCK threads in kSplits groups, each
// group reducing its share of every stage.
struct SplitGemm {
    static constexpr int kRows = CCPL_SMALL_S_TILE_ROWS;
    static constexpr int kCols = 64;
    static constexpr int kSplits = 4;                            // groups splitting a reduction
    static constexpr int kGroup = CCPL_SMALL_S_BLOCK / kSplits;  // threads of a group
    static constexpr int kMicro = 4;                             // each thread: kMicro x kMicro
    static constexpr int kStep = 32;  // reduction depth per stage, kStep / kSplits a group
    static constexpr int kMicroRows = kRows / kMicro;
    static constexpr int kMicroCols = kCols / kMicro;
};
static_assert(SplitGemm::kGroup == SplitGemm::kMicroRows * SplitGemm::kMicroCols,
              "a group's micro-tiles cover the tile");
static_assert(SplitGemm::kStep % SplitGemm::kSplits == 0, "the groups split a stage evenly");

// The operands of one stage, reduction-index major, or the partial sums of groups 1.. .
union SplitGemmShared {
    struct {
        // Padded: the stores along k are conflict-free.
        float a[SplitGemm::kStep][SplitGemm::kRows + 1];
        float b[SplitGemm::kStep][SplitGemm::kCols + 1];
    } stage;
    float partial[SplitGemm::kSplits - 1][SplitGemm::kRows][SplitGemm::kCols + 1];
};

// out(m, n, A B [m][n]) for the block's kRows x kCols tile of A B over k in [0, depth):
// load_a(m, k) and load_b(k, n) give the operands (0 outside the matrices). Each group of
// kGroup threads reduces its quarter of every kStep-deep stage into kMicro x kMicro
// accumulators a thread (rows ty + 4i, columns tx + 16j); group 0 then adds the other groups'
// sums in a fixed order and calls out, so the result does not depend on scheduling, and A B
// and B A hold the same bits (fmaf is commutative). kBAlongK: consecutive threads load
// consecutive k of B (true) or consecutive n (false), whichever is contiguous in memory.
// Every thread of the block calls this; it begins and ends with the shared operands free.
template <bool kBAlongK, typename LoadA, typename LoadB, typename Out>
__device__ __forceinline__ void split_gemm_tile(SplitGemmShared& s, int64_t depth,
                                                const LoadA& load_a, const LoadB& load_b,
                                                const Out& out) {
    using G = SplitGemm;
    const int group = threadIdx.x / G::kGroup, u = threadIdx.x % G::kGroup;
    const int ty = u / G::kMicroCols, tx = u % G::kMicroCols;
    float acc[G::kMicro][G::kMicro] = {};
    for (int64_t k0 = 0; k0 < depth; k0 += G::kStep) {
        for (int e = threadIdx.x; e < G::kRows * G::kStep; e += blockDim.x) {
            const int m = e / G::kStep, kk = e % G::kStep;
            s.stage.a[kk][m] = load_a(m, k0 + kk);
        }
        for (int e = threadIdx.x; e < G::kCols * G::kStep; e += blockDim.x) {
            const int n = kBAlongK ? e / G::kStep : e % G::kCols;
            const int kk = kBAlongK ? e % G::kStep : e / G::kCols;
            s.stage.b[kk][n] = load_b(k0 + kk, n);
        }
        __syncthreads();
        const int k_begin = group * (G::kStep / G::kSplits);
        for (int kk = k_begin; kk < k_begin + G::kStep / G::kSplits; ++kk) {
            float a[G::kMicro], b[G::kMicro];
#pragma unroll
            for (int i = 0; i < G::kMicro; ++i) a[i] = s.stage.a[kk][ty + G::kMicroRows * i];
#pragma unroll
            for (int j = 0; j < G::kMicro; ++j) b[j] = s.stage.b[kk][tx + G::kMicroCols * j];
#pragma unroll
            for (int i = 0; i < G::kMicro; ++i)
#pragma unroll
                for (int j = 0; j < G::kMicro; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
    const auto row = [&](int i) { return ty + G::kMicroRows * i; };
    const auto col = [&](int j) { return tx + G::kMicroCols * j; };
    if (group > 0) {
#pragma unroll
        for (int i = 0; i < G::kMicro; ++i)
#pragma unroll
            for (int j = 0; j < G::kMicro; ++j) s.partial[group - 1][row(i)][col(j)] = acc[i][j];
    }
    __syncthreads();
    if (group == 0) {
#pragma unroll
        for (int i = 0; i < G::kMicro; ++i) {
#pragma unroll
            for (int j = 0; j < G::kMicro; ++j) {
                float v = acc[i][j];
#pragma unroll
                for (int g = 0; g < G::kSplits - 1; ++g) v += s.partial[g][row(i)][col(j)];
                out(row(i), col(j), v);
            }
        }
    }
    __syncthreads();
}

}  // namespace ccpl
