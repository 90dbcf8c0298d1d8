// row_stats.cuh: the running statistics of a row of logits for its logsumexp, shared by
// info_nce.cu (a warp per row of stored logits) and info_nce_fused.cu (logits tile by tile),
// and the entries of softmax - I that both backward kernels form from them.
//
// A row seen so far is (max, rest): its maximum and rest = the sum of exp(x - max) over its
// elements other than (one) maximum, rescaled when the maximum grows. One exp per element,
// no overflow at any tau, and log(sum exp(x - max)) = log1p(rest) keeps its relative
// precision when the maximum dominates the row, so row_loss = (max - L_ii) + log1p(rest)
// stays precise when the loss is tiny (lse - L_ii would cancel).
#pragma once

#include "common.cuh"

namespace ccpl {

struct RowStats {
    float max;
    float rest;
};

__device__ __forceinline__ RowStats row_stats_empty() { return RowStats{-INFINITY, 0.0f}; }

// Adds element x.
__device__ __forceinline__ void row_stats_push(RowStats& s, float x) {
    if (x > s.max) {
        s.rest = (s.rest + 1.0f) * expf(s.max - x);
        s.max = x;
    } else {
        s.rest += expf(x - s.max);
    }
}

// The statistics of the union of two disjoint parts of a row: the larger maximum stays the
// one kept out of the sum; the other part's maximum joins it as its 1.
__device__ __forceinline__ RowStats row_stats_merge(RowStats a, RowStats b) {
    if (b.max == -INFINITY) return a;
    if (a.max == -INFINITY) return b;
    if (a.max < b.max) {
        const RowStats t = a;
        a = b;
        b = t;
    }
    return RowStats{a.max, a.rest + (b.rest + 1.0f) * expf(b.max - a.max)};
}

// Entry (i, j) of softmax(L) - I from row i's statistics as the forward left them (lse_i and
// row_loss_i = lse_i - L_ii): P_ij = exp(L_ij - lse_i) off the diagonal; on it, P_ii - 1 =
// expm1(-row_loss_i), which keeps its precision when P_ii is close to 1 (exp(L_ii - lse_i) - 1
// would cancel). The one formula of every backward kernel.
__device__ __forceinline__ float softmax_minus_eye(bool diagonal, float logit, float lse, float row_loss) {
    return diagonal ? expm1f(-row_loss) : expf(logit - lse);
}

}  // namespace ccpl
