// info_nce_fused.cu: the InfoNCE loss of the logits L = q kᵀ / tau and its backward without
// storing the logits (flash-style): each block recomputes the 64x64 logits tiles it needs
// and consumes them on the chip. Memory is O(B*S*C) instead of the (B, S, S) float logits of
// similarity.cu + info_nce.cu (17 GB at S = 65536), which stay as the standalone kernels.
//
// Two ways to compute a tile, chosen by the storage type (logits_tiles.cuh); either way the
// logits hold the same bits as similarity_{T} stores (tile_logit), so the forward equals the
// materialised path's up to the order of the row statistics' sums, and the f32 backward equals
// it bit for bit given the same statistics:
// - float: the FMA tile GEMM of tile_gemm.cuh;
// - __half, __nv_bfloat16: tensor cores (tile_mma.cuh), float accumulation. The backward's
//   second product takes G rounded to T (as FlashAttention does its P): a relative error of
//   up to the unit roundoff of T per element of G, modelled and measured by
//   tests/kernel_info_nce_fused.rs.
#include "logits_tiles.cuh"
#include "row_stats.cuh"

namespace ccpl {

// One block per (64-row tile, image): blockIdx.y the row tile, blockIdx.z the image. The
// block walks the column tiles; each thread keeps the running statistics (row_stats.cuh) of
// its 4 rows over its 4 columns of every tile, and the 16 threads of a row (one half-warp,
// gemm_row) merge them by shuffles at the end. The diagonal logit is kept in shared memory by
// the thread that computes it.
template <typename T, typename Tiles>
__device__ void info_nce_fused_forward_rows(const ccpl_info_nce_fused_forward_params& p,
                                            Tiles& tiles, float* diagonal) {
    const int64_t S = p.shape.rows, C = p.shape.width, b = blockIdx.z;
    const int64_t i0 = (int64_t)blockIdx.y * kTileSide;
    const T* __restrict__ q = ptr<T>(p.q) + b * S * C;
    const T* __restrict__ k = ptr<T>(p.k) + b * S * C;
    RowStats stats[Gemm::kMicro];
#pragma unroll
    for (int i = 0; i < Gemm::kMicro; ++i) stats[i] = row_stats_empty();
    for (int64_t j0 = 0; j0 < S; j0 += kTileSide) {
        tiles.compute(q, k, S, C, i0, j0);
#pragma unroll
        for (int i = 0; i < Gemm::kMicro; ++i) {
#pragma unroll
            for (int j = 0; j < Gemm::kMicro; ++j) {
                const int64_t row = i0 + gemm_row(i), col = j0 + gemm_col(j);
                if (col >= S) continue;
                const float logit = tile_logit(tiles.at(i, j), p.inv_tau);
                row_stats_push(stats[i], logit);
                if (row == col) diagonal[gemm_row(i)] = logit;
            }
        }
        tiles.release();
    }
    // The threads of a row are lanes tx = 0..15 of one half-warp: xor 1..8 stays inside it.
#pragma unroll
    for (int i = 0; i < Gemm::kMicro; ++i) {
        for (int o = Gemm::kSide / 2; o > 0; o /= 2) {
            const RowStats other{__shfl_xor_sync(kFullMask, stats[i].max, o),
                                 __shfl_xor_sync(kFullMask, stats[i].rest, o)};
            stats[i] = row_stats_merge(stats[i], other);
        }
    }
    // The diagonal logit of a row was written by another lane of its half-warp; shuffles do
    // not order memory. (Not a planted bug: the emulator runs a warp's lanes in step at the
    // shuffles, so it cannot tell.)
    __syncthreads();
    if (gemm_col(0) != 0) return;
    float* __restrict__ row_lse = mut_ptr<float>(p.stats.row_lse) + b * S;
    float* __restrict__ row_loss = mut_ptr<float>(p.stats.row_loss) + b * S;
#pragma unroll
    for (int i = 0; i < Gemm::kMicro; ++i) {
        const int64_t row = i0 + gemm_row(i);
        if (row >= S) continue;
        const float log_sum = log1pf(stats[i].rest);
        row_lse[row] = stats[i].max + log_sum;
        row_loss[row] = (stats[i].max - diagonal[gemm_row(i)]) + log_sum;
    }
}

template <typename T>
__device__ void info_nce_fused_forward(const ccpl_info_nce_fused_forward_params& p) {
    __shared__ float diagonal[kTileSide];
    with_logits_tiles<T>([&](auto& tiles) { info_nce_fused_forward_rows<T>(p, tiles, diagonal); });
}

// The backward's view of one output tile: rows r0.. of `own` (q for dq, k for dk), the C
// columns c0.., the reduction over the rows of `other`, blockIdx.z the image.
template <typename T> struct FusedBackwardTile {
    int64_t S, C, r0, c0;
    const float* __restrict__ lse;
    const float* __restrict__ row_loss;
    const T* __restrict__ own;
    const T* __restrict__ other;
    float inv_tau;

    // G at own row r, other row c (rows past S: 0) from the unscaled logit of the pair:
    // entry (i, j) of softmax - I of the softmax row i = r (c with kTranspose).
    template <bool kTranspose>
    __device__ __forceinline__ float g(int64_t r, int64_t c, float dot) const {
        if (r >= S || c >= S) return 0.0f;
        const int64_t row = kTranspose ? c : r;
        return softmax_minus_eye(r == c, tile_logit(dot, inv_tau), lse[row], row_loss[row]);
    }
    // The other side's rows n0.. at output column `col` of the tile, zero outside.
    __device__ __forceinline__ T other_at(int64_t n, int col) const {
        const int64_t c = c0 + col;
        return n < S && c < C ? other[n * C + c] : from_float<T>(0.0f);
    }
};

// FMA path. For each 64-wide tile n0 of the reduction index, GEMM 1 recomputes the logits
// tile (own rows against the other side's rows), which becomes G in shared memory, and
// GEMM 2 adds G · other[n0.., c0..] to the accumulators.
struct FmaBackwardShared {
    GemmShared gemm;
    float g[kTileSide][Gemm::kStride];
};

template <typename T, bool kTranspose>
__device__ void info_nce_fused_backward_fma(const FusedBackwardTile<T>& t, FmaBackwardShared& smem,
                                            GemmAcc& out) {
    for (int64_t n0 = 0; n0 < t.S; n0 += kTileSide) {
        GemmAcc logits = {};
        gemm_row_products(smem.gemm, t.own, t.other, t.S, t.C, t.r0, n0, logits);
#pragma unroll
        for (int i = 0; i < Gemm::kMicro; ++i) {
#pragma unroll
            for (int j = 0; j < Gemm::kMicro; ++j) {
                const int m = gemm_row(i), n = gemm_col(j);
                smem.g[m][n] = t.template g<kTranspose>(t.r0 + m, n0 + n, logits[i][j]);
            }
        }
        __syncthreads();  // G, written by every thread, read by the fills of GEMM 2
        const auto load_g = [&](int m, int64_t n) { return smem.g[m][n]; };
        const auto load_other = [&](int64_t n, int col) { return to_float(t.other_at(n0 + n, col)); };
        // gemm_tile ends with a barrier: the next G may overwrite this one.
        gemm_tile<true, false, true>(smem.gemm, kTileSide, load_g, load_other, out);  // summed apart from out
    }
}

// G is rounded to T for GEMM 2 times kGScale<T>, a power of two (exact), undone on the
// output: |G| <= 1, so in __half 2^15 G stays below the largest finite value (65504), and
// the small softmax entries of a low temperature stay normal numbers down to 2^-29 instead of
// flushing below 2^-14. __nv_bfloat16 has float's range: no scaling.
template <typename T> constexpr float kGScale = std::is_same<T, __half>::value ? 32768.0f : 1.0f;

// Tensor-core path: the same steps; G rounded to T (scaled by kGScale) for GEMM 2, the other
// side's tile staged in T where GEMM 1's operands were.
template <typename T> struct MmaBackwardShared {
    union {
        MmaStage<T> stage;                             // GEMM 1's operands
        __align__(32) T other[kTileSide][Mma::kTileLd];  // GEMM 2's B
    };
    MmaTile logits;                                // GEMM 1's result, then the output tile
    __align__(32) T g[kTileSide][Mma::kTileLd];  // GEMM 2's A
};

template <typename T, bool kTranspose>
__device__ void info_nce_fused_backward_mma(const FusedBackwardTile<T>& t, MmaBackwardShared<T>& smem,
                                            GemmAcc& out) {
    MmaAcc acc[Mma::kBlocksPerWarp];
#pragma unroll
    for (int f = 0; f < Mma::kBlocksPerWarp; ++f) wmma::fill_fragment(acc[f], 0.0f);
    for (int64_t n0 = 0; n0 < t.S; n0 += kTileSide) {
        mma_row_products(smem.stage, smem.logits, t.own, t.other, t.S, t.C, t.r0, n0);
        __syncthreads();  // the logits tile, stored by every warp; the stage free
        for (int e = threadIdx.x; e < kTileSide * kTileSide; e += kTileThreads) {
            const int m = e / kTileSide, n = e % kTileSide;
            const float g = t.template g<kTranspose>(t.r0 + m, n0 + n, smem.logits[m][n]);
            smem.g[m][n] = from_float<T>(g * kGScale<T>);
            smem.other[m][n] = t.other_at(n0 + m, n);
        }
        __syncthreads();  // G and the other side's tile, written by every thread
        mma_accumulate(smem.g, smem.other, acc);
        __syncthreads();  // the next logits product overwrites the stage (other) and G
    }
    mma_store(smem.logits, acc);
    __syncthreads();
#pragma unroll
    for (int i = 0; i < Gemm::kMicro; ++i)
#pragma unroll
        for (int j = 0; j < Gemm::kMicro; ++j)
            out[i][j] = smem.logits[gemm_row(i)][gemm_col(j)] * (1.0f / kGScale<T>);
}

// One 64x64 tile of grad = G · other * upstream / (B*S) / tau: blockIdx.y the tile of output
// rows (rows of q for dq, of k for dk with kTranspose), blockIdx.x the tile of the C
// columns, blockIdx.z the image. The output is tiled over C to keep the accumulators in
// registers at any width, at the price of recomputing the logits once per 64 columns of C
// (GEMM 1 costs C/64 times its minimum; at C = 128 the block does twice the logits work).
template <typename T, bool kTranspose, typename Shared>
__device__ void info_nce_fused_backward_tile(const ccpl_info_nce_fused_backward_params& p,
                                             Shared& smem) {
    const int64_t S = p.grad.shape.rows, C = p.grad.shape.width, b = blockIdx.z;
    const T* __restrict__ q = ptr<T>(p.q) + b * S * C;
    const T* __restrict__ k = ptr<T>(p.k) + b * S * C;
    const FusedBackwardTile<T> t{S,
                                 C,
                                 (int64_t)blockIdx.y * kTileSide,
                                 (int64_t)blockIdx.x * kTileSide,
                                 ptr<float>(p.grad.stats.row_lse) + b * S,
                                 ptr<float>(p.grad.stats.row_loss) + b * S,
                                 kTranspose ? k : q,
                                 kTranspose ? q : k,
                                 p.grad.inv_tau};
    GemmAcc out = {};
    if constexpr (kTensorCores<T>) {
        info_nce_fused_backward_mma<T, kTranspose>(t, smem, out);
    } else {
        info_nce_fused_backward_fma<T, kTranspose>(t, smem, out);
    }
    const float scale = ptr<float>(p.grad.upstream)[0] / (float)((int64_t)p.grad.shape.batch * S) * p.grad.inv_tau;
    T* __restrict__ grad = mut_ptr<T>(p.grad.out) + b * S * C;
    gemm_store(grad, S, C, t.r0, t.c0, [&](int i, int j) { return from_float<T>(out[i][j] * scale); });
}

// The backward's shared memory for T: the tensor-core or the FMA path's.
template <typename T>
using FusedBackwardShared = std::conditional_t<kTensorCores<T>, MmaBackwardShared<T>, FmaBackwardShared>;

template <typename T>
__device__ void info_nce_fused_backward(const ccpl_info_nce_fused_backward_params& p) {
    __shared__ FusedBackwardShared<T> smem;
    bool_switch(p.grad.transpose, [&](auto transpose) {
        info_nce_fused_backward_tile<T, decltype(transpose)::value>(p, smem);
    });
}

}  // namespace ccpl

using ccpl::info_nce_fused_backward;
using ccpl::info_nce_fused_forward;
CCPL_KERNELS_PER_DTYPE(info_nce_fused_forward, ccpl_info_nce_fused_forward_params)
CCPL_KERNELS_PER_DTYPE(info_nce_fused_backward, ccpl_info_nce_fused_backward_params)
