// info_nce.cu: cross-entropy of each row of the logits with its diagonal as the target
// (forward: logsumexp and row losses, then their mean) and its backward through the logits
// into the normalised rows (dq, and dk with `transpose`).
#include "row_stats.cuh"
#include "tile_gemm.cuh"

namespace ccpl {

// One warp per row (B*S rows of S logits: as many warps as the row is long, so the GPU is
// full whenever the row is long enough to matter). Each lane keeps the running statistics of
// row_stats.cuh over its elements; the lanes merge by shuffles, the max element of the row
// contributing the 1 of log1p(rest).
__device__ void info_nce_forward(const ccpl_info_nce_forward_params& p) {
    const int lane = threadIdx.x % kWarp;
    const int64_t S = p.rows, total = (int64_t)p.batch * S;
    const int64_t first = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / kWarp;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x / kWarp;
    for (int64_t row = first; row < total; row += stride) {
        const float* __restrict__ L = ptr<float>(p.logits) + row * S;
        RowStats stats = row_stats_empty();
        for (int64_t j = lane; j < S; j += kWarp) row_stats_push(stats, L[j]);
        const float max = stats.max, rest = stats.rest;
        const float row_max = warp_max(max);
        // The first lane holding the row max keeps its max out of the sum; every other lane
        // adds all its terms, rescaled to the row max (a lane without elements adds 0).
        const unsigned at_max = __ballot_sync(kFullMask, max == row_max);
        const bool keeps_max = lane == __ffs((int)at_max) - 1;
        const float mine = keeps_max ? rest
                           : max == -INFINITY ? 0.0f
                                              : (rest + 1.0f) * expf(max - row_max);
        const float log_sum = log1pf(warp_sum(mine));
        if (lane == 0) {
            mut_ptr<float>(p.stats.row_lse)[row] = row_max + log_sum;
            mut_ptr<float>(p.stats.row_loss)[row] = (row_max - L[row % S]) + log_sum;
        }
    }
}

// loss = mean of row_loss (+= with accumulate), by one block in a fixed order: each thread a
// sum of a fixed strided subset, then the fixed shuffle tree. The same bits on every run. In
// double: a float sum of B*S row losses overflows where their mean fits (a low temperature
// gives row losses near 2/tau), and double's 53 bits keep the sum of up to 2^31 float terms
// within float's rounding of the mean.
__device__ void info_nce_loss(const ccpl_info_nce_loss_params& p) {
    __shared__ double scratch[kWarp];
    const float* __restrict__ row_loss = ptr<float>(p.row_loss);
    double sum = 0.0;
    for (int64_t i = threadIdx.x; i < p.count; i += blockDim.x) sum += row_loss[i];
    sum = block_sum(sum, scratch);
    if (threadIdx.x == 0) {
        float* loss = mut_ptr<float>(p.loss);
        const float mean = (float)(sum / (double)p.count);
        *loss = p.accumulate ? *loss + mean : mean;
    }
}

// One 64x64 tile of grad = G · other * upstream / (B*S) / tau with G = softmax(L) - I
// computed on the fly from the logits and the forward's row statistics. kTranspose reads Gᵀ (dk: the
// tile rows are columns j of L, the reduction runs over rows i).
template <typename T, bool kTranspose>
__device__ void info_nce_backward_tile(const ccpl_info_nce_backward_params& p, GemmShared& smem) {
    const int64_t S = p.grad.shape.rows, C = p.grad.shape.width, b = blockIdx.z;
    const int64_t r0 = (int64_t)blockIdx.y * kTileSide, c0 = (int64_t)blockIdx.x * kTileSide;
    const float* __restrict__ L = ptr<float>(p.logits) + b * S * S;
    const float* __restrict__ lse = ptr<float>(p.grad.stats.row_lse) + b * S;
    const float* __restrict__ row_loss = ptr<float>(p.grad.stats.row_loss) + b * S;
    const T* __restrict__ other = ptr<T>(p.other) + b * S * C;
    const auto g = [&](int64_t i, int64_t j) {
        return softmax_minus_eye(i == j, L[i * S + j], lse[i], row_loss[i]);
    };
    // A: G (rows r0.., read along j) or Gᵀ (rows are columns of L, read along them).
    const auto load_g = [&](int m, int64_t k) {
        const int64_t r = r0 + m;
        if (r >= S || k >= S) return 0.0f;
        return kTranspose ? g(k, r) : g(r, k);
    };
    // B: the other side's normalised rows, read along C.
    const auto load_other = [&](int64_t k, int n) {
        const int64_t c = c0 + n;
        return k < S && c < C ? to_float(other[k * C + c]) : 0.0f;
    };
    GemmAcc acc = {};
    gemm_tile<!kTranspose, false, true>(smem, S, load_g, load_other, acc);  // S: a long one
    const float scale = ptr<float>(p.grad.upstream)[0] / (float)((int64_t)p.grad.shape.batch * S) * p.grad.inv_tau;
    T* __restrict__ grad = mut_ptr<T>(p.grad.out) + b * S * C;
    gemm_store(grad, S, C, r0, c0, [&](int i, int j) { return from_float<T>(acc[i][j] * scale); });
}

template <typename T> __device__ void info_nce_backward(const ccpl_info_nce_backward_params& p) {
    __shared__ GemmShared smem;
    bool_switch(p.grad.transpose, [&](auto transpose) {
        info_nce_backward_tile<T, decltype(transpose)::value>(p, smem);
    });
}

}  // namespace ccpl

CCPL_KERNEL(info_nce_forward, ccpl_info_nce_forward_params) { ccpl::info_nce_forward(p); }
CCPL_KERNEL(info_nce_loss, ccpl_info_nce_loss_params) { ccpl::info_nce_loss(p); }
using ccpl::info_nce_backward;
CCPL_KERNELS_PER_DTYPE(info_nce_backward, ccpl_info_nce_backward_params)
