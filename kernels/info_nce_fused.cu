// info_nce_fused.cu: the InfoNCE loss of the logits L = q kᵀ / tau and its backward without
// storing the logits (flash-style): each block recomputes the 64x64 logits tiles it needs
// with the tile GEMM of tile_gemm.cuh and consumes them on the chip. Memory is O(B*S*C)
// instead of the (B, S, S) float logits of similarity.cu + info_nce.cu (17 GB at S = 65536),
// which stay as the standalone kernels. The results equal theirs up to the order of the
// row statistics' sums: the logits tiles hold the same bits (gemm_row_products).
#include "row_stats.cuh"
#include "tile_gemm.cuh"

namespace ccpl {

// One block per (64-row tile, image): blockIdx.y the row tile, blockIdx.z the image. The
// block walks the column tiles; each thread keeps the running statistics (row_stats.cuh) of
// its 4 rows over its 4 columns of every tile, and the 16 threads of a row (one half-warp,
// gemm_row) merge them by shuffles at the end. The diagonal logit is kept in shared memory by
// the thread that computes it.
template <typename T>
__device__ void info_nce_fused_forward(const ccpl_info_nce_fused_forward_params& p) {
    __shared__ GemmShared smem;
    __shared__ float diagonal[Gemm::kTile];
    const int64_t S = p.rows, C = p.width, b = blockIdx.z;
    const int64_t i0 = (int64_t)blockIdx.y * Gemm::kTile;
    const T* __restrict__ q = ptr<T>(p.q) + b * S * C;
    const T* __restrict__ k = ptr<T>(p.k) + b * S * C;
    RowStats stats[Gemm::kMicro];
#pragma unroll
    for (int i = 0; i < Gemm::kMicro; ++i) stats[i] = row_stats_empty();
    for (int64_t j0 = 0; j0 < S; j0 += Gemm::kTile) {
        GemmAcc acc = {};
        gemm_row_products(smem, q, k, S, C, i0, j0, acc);
#pragma unroll
        for (int i = 0; i < Gemm::kMicro; ++i) {
#pragma unroll
            for (int j = 0; j < Gemm::kMicro; ++j) {
                const int64_t row = i0 + gemm_row(i), col = j0 + gemm_col(j);
                if (col >= S) continue;
                const float logit = acc[i][j] * p.inv_tau;
                row_stats_push(stats[i], logit);
                if (row == col) diagonal[gemm_row(i)] = logit;
            }
        }
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
    float* __restrict__ row_lse = mut_ptr<float>(p.row_lse) + b * S;
    float* __restrict__ row_loss = mut_ptr<float>(p.row_loss) + b * S;
#pragma unroll
    for (int i = 0; i < Gemm::kMicro; ++i) {
        const int64_t row = i0 + gemm_row(i);
        if (row >= S) continue;
        const float log_sum = log1pf(stats[i].rest);
        row_lse[row] = stats[i].max + log_sum;
        row_loss[row] = (stats[i].max - diagonal[gemm_row(i)]) + log_sum;
    }
}

// The shared memory of the backward: the GEMMs' operand tiles and one tile of G.
struct FusedBackwardShared {
    GemmShared gemm;
    float g[Gemm::kTile][Gemm::kStride];
};

// One 64x64 tile of grad = G · other * upstream / (B*S) / tau: blockIdx.y the tile of output
// rows r (rows of q for dq, of k for dk with kTranspose), blockIdx.x the tile of the C
// columns, blockIdx.z the image. For each 64-wide tile n of the reduction index, GEMM 1
// recomputes the logits tile (own rows r against the other side's rows n), which becomes
// G (or Gᵀ) in shared memory as info_nce_backward forms it, and GEMM 2 adds G · other[n, c].
// The output is tiled over C to keep the accumulators in registers at any width, at the price
// of recomputing the logits once per 64 columns of C (GEMM 1 costs C/64 times its minimum;
// at C = 128 the block does twice the logits work for half the output).
template <typename T, bool kTranspose>
__device__ void info_nce_fused_backward_tile(const ccpl_info_nce_fused_backward_params& p,
                                             FusedBackwardShared& smem) {
    const int64_t S = p.rows, C = p.width, b = blockIdx.z;
    const int64_t r0 = (int64_t)blockIdx.y * Gemm::kTile, c0 = (int64_t)blockIdx.x * Gemm::kTile;
    const float* __restrict__ lse = ptr<float>(p.row_lse) + b * S;
    const float* __restrict__ row_loss = ptr<float>(p.row_loss) + b * S;
    const T* __restrict__ q = ptr<T>(p.q) + b * S * C;
    const T* __restrict__ k = ptr<T>(p.k) + b * S * C;
    const T* __restrict__ own = kTranspose ? k : q;
    const T* __restrict__ other = kTranspose ? q : k;
    GemmAcc out = {};
    for (int64_t n0 = 0; n0 < S; n0 += Gemm::kTile) {
        // logits[m][n] = L[r0+m][n0+n], or L[n0+n][r0+m] with kTranspose.
        GemmAcc logits = {};
        gemm_row_products(smem.gemm, own, other, S, C, r0, n0, logits);
#pragma unroll
        for (int i = 0; i < Gemm::kMicro; ++i) {
#pragma unroll
            for (int j = 0; j < Gemm::kMicro; ++j) {
                const int m = gemm_row(i), n = gemm_col(j);
                const int64_t r = r0 + m, c = n0 + n;
                // The softmax row: i of L_ij.
                const int64_t row = kTranspose ? c : r;
                float g = 0.0f;
                if (r < S && c < S) {
                    // P_ii - 1 by expm1 of the row loss, precise when P_ii is close to 1.
                    g = r == c ? expm1f(-row_loss[row])
                               : expf(logits[i][j] * p.inv_tau - lse[row]);
                }
                smem.g[m][n] = g;
            }
        }
        __syncthreads();  // G, written by every thread, read by the fills of GEMM 2
        const auto load_g = [&](int m, int64_t n) { return smem.g[m][n]; };
        const auto load_other = [&](int64_t n, int col) {
            const int64_t j = n0 + n, c = c0 + col;
            return j < S && c < C ? to_float(other[j * C + c]) : 0.0f;
        };
        // gemm_tile ends with a barrier: the next G may overwrite this one.
        gemm_tile<true, false>(smem.gemm, Gemm::kTile, load_g, load_other, out);
    }
    const float scale = ptr<float>(p.upstream)[0] / (float)((int64_t)p.batch * S) * p.inv_tau;
    T* __restrict__ grad = mut_ptr<T>(p.grad) + b * S * C;
#pragma unroll
    for (int i = 0; i < Gemm::kMicro; ++i) {
        const int64_t row = r0 + gemm_row(i);
#pragma unroll
        for (int j = 0; j < Gemm::kMicro; ++j) {
            const int64_t col = c0 + gemm_col(j);
            if (row < S && col < C) grad[row * C + col] = from_float<T>(out[i][j] * scale);
        }
    }
}

template <typename T>
__device__ void info_nce_fused_backward(const ccpl_info_nce_fused_backward_params& p) {
    __shared__ FusedBackwardShared smem;
    if (p.transpose) {
        info_nce_fused_backward_tile<T, true>(p, smem);
    } else {
        info_nce_fused_backward_tile<T, false>(p, smem);
    }
}

}  // namespace ccpl

using ccpl::info_nce_fused_backward;
using ccpl::info_nce_fused_forward;
CCPL_KERNELS_PER_DTYPE(info_nce_fused_forward, ccpl_info_nce_fused_forward_params)
CCPL_KERNELS_PER_DTYPE(info_nce_fused_backward, ccpl_info_nce_fused_backward_params)
