// row_norm.cuh: a row's L2 norm without overflow or underflow, and the backward of the
// normalisation d / (||d|| + eps) (spec step 5), each computed by the 32 lanes of one warp.
// The row is read through a callback, so the same code serves rows in memory of any type
// and rows computed on the fly.
#pragma once

#include "common.cuh"

namespace ccpl {

constexpr float kNormEps = (float)CCPL_NORM_EPS;

// ||row|| of the C elements load(0..C), scaled: the largest |x| first, then the sum of
// squares of x / max, then max * sqrt(that). No square overflows (features of 1e19 square to
// 1e38, past float's range) or underflows (1e-30 squares to 0), so every finite row whose
// norm is a float gets it. x / max is a division, not a product with 1 / max: the largest
// element scales to exactly 1, so a row with one nonzero element has exactly its |x| as
// norm, and d / norm is exactly +-1 there (the backward's along-row part then cancels
// exactly). A row whose largest element is subnormal is scaled by 2^24 (exactly) first, so
// the quotients stay in range. Every lane gets the norm; 0 for a zero row.
template <typename Load> __device__ __forceinline__ float warp_row_norm(int64_t C, const Load& load) {
    const int lane = threadIdx.x % kWarp;
    float largest = 0.0f;
    for (int64_t c = lane; c < C; c += kWarp) largest = fmaxf(largest, fabsf(load(c)));
    largest = warp_max(largest);
    if (largest == 0.0f) return 0.0f;
    const float pre = largest < 0x1p-126f ? 0x1p24f : 1.0f;
    const float scaled_largest = largest * pre;
    float squares = 0.0f;
    for (int64_t c = lane; c < C; c += kWarp) {
        const float t = load(c) * pre / scaled_largest;
        squares = fmaf(t, t, squares);
    }
    return largest * sqrtf(warp_sum(squares));
}

// The backward of v = d / (n + eps) for a row d of norm n and the gradient g of v:
//     g_d = g/(n+eps) - d (d.g) / (n (n+eps)^2),
// written with u = d/n and a = u.g as ((g - u a) + u a eps/(n+eps)) / (n+eps): the component
// of g across the row plus what is left of the one along it. So the cancellation of the
// along-row component happens exactly (for C = 1, u = +-1 and g - u a is 0 exactly) instead
// of in the difference of two rounded terms, and no product of small numbers underflows.
// Where n == 0 the second term of the spec is 0: g_d = g/eps, never NaN. load_d(c) and
// load_g(c) read the row and g; store(c, v) writes g_d[c], and may overwrite g (each lane
// reads its elements before writing them).
template <typename LoadD, typename LoadG, typename Store>
__device__ __forceinline__ void warp_unit_row_backward(int64_t C, float norm, const LoadD& load_d,
                                                       const LoadG& load_g, const Store& store) {
    const int lane = threadIdx.x % kWarp;
    const float scale = 1.0f / (norm + kNormEps);
    if (norm > 0.0f) {
        float along = 0.0f;
        for (int64_t c = lane; c < C; c += kWarp) along = fmaf(load_d(c) / norm, load_g(c), along);
        along = warp_sum(along);
        const float kept = kNormEps * scale;  // eps/(n+eps): what survives along u
        for (int64_t c = lane; c < C; c += kWarp) {
            const float u_along = load_d(c) / norm * along;
            store(c, ((load_g(c) - u_along) + u_along * kept) * scale);
        }
    } else {
        for (int64_t c = lane; c < C; c += kWarp) store(c, load_g(c) * scale);
    }
}

}  // namespace ccpl
