// row_norm.cuh: the L2 norm of a row, and the row normalised by it, without overflow or
// underflow of the sum of squares; and the backward of that normalisation. Every kernel that
// normalises a row goes through here (normalize.cu; neighbor.cuh's difference rows normalised
// as they are formed, for neighbor.cu and small_s.cu's gather; small_s.cu's rows), so that all
// of them agree with the float64 reference at any magnitude float holds.
//
// Why: the square of a float overflows from |x| about 1.8e19 (sum of squares inf: the row
// normalises to 0, the loss to ln S, the gradients to 0) and underflows below about 1e-19
// (norm 0 or imprecise). So the row is first multiplied by a power of two, `scale`, that brings
// its largest magnitude into [1, 2) (exact: only the exponent changes), its squares summed,
// the root taken. The norm is `scaled / scale`, which itself exceeds float's range (inf) only
// for a row of several elements near FLT_MAX; the normalised row, computed at scale as
// x * scale / (scaled + eps * scale), is right at any magnitude.
//
// The API, for a row of C elements spread over the 32 lanes of a warp (lane l holds elements
// c = l, l + 32, ...):
//
//     const ScaledNorm n = scaled_norm(lane, C, load);  // every lane of the warp calls it
//     out[c] = from_float<T>(load(c, n.scale) * n.unit_factor());  // element / (||row|| + eps)
//     norms[row] = n.norm();                                        // ||row||, inf past FLT_MAX
//
// where load(c, scale) returns element c times `scale`, a power of two (see scaled_norm).
#pragma once

#include "common.cuh"

namespace ccpl {

// The spec's epsilon added to a row's norm before dividing (CCPL_NORM_EPS).
constexpr float kNormEps = (float)CCPL_NORM_EPS;

// Rows spread over warps, one warp per row: lanes stride over the row (coalesced for any
// width, C = 1 included) and reduce with shuffles, so a row needs no shared memory and no
// barrier. The loop over rows has the same bound for the whole warp, as the shuffles require.
__device__ __forceinline__ int64_t first_warp_row() {
    return ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / kWarp;
}
__device__ __forceinline__ int64_t warp_row_stride() {
    return (int64_t)gridDim.x * blockDim.x / kWarp;
}

// A row's L2 norm as scaled / scale.
struct ScaledNorm {
    // ||row * scale||: in [1, 2 sqrt(C)] for a non-zero row, 0 for a zero row (at most
    // 4 sqrt(C) for the rows whose magnitude the clamp of `scale` leaves above 2).
    float scaled;
    // A power of two in [2^-126, 2^126] (a normal float, exact to multiply by).
    float scale;

    // ||row||; inf when it exceeds float's range.
    __device__ __forceinline__ float norm() const { return scaled / scale; }
    // What an element times `scale` is multiplied by to give the element of the normalised
    // row, x / (||row|| + eps) = (x * scale) / (scaled + eps * scale): finite for any row
    // (eps * scale <= 1e-7 * 2^126), 1/eps for a zero row. Rounded as written, never fused: the
    // same row gives the same bits wherever it is normalised (small_s.cu's two launches).
    __device__ __forceinline__ float unit_factor() const {
        return 1.0f / __fadd_rn(scaled, __fmul_rn(kNormEps, scale));
    }
};

// The power of two that brings a row's largest magnitude into [1, 2), clamped to a normal
// float: 1 for a zero row; 2^-126 for an infinite one (an element that overflowed unscaled, see
// scaled_norm: at 2^-126 every difference of two finite floats is below 8).
__device__ __forceinline__ float norm_scale(float max_abs) {
    if (isinf(max_abs)) return 0x1p-126f;
    if (!(max_abs > 0.0f)) return 1.0f;
    int exponent;
    frexpf(max_abs, &exponent);  // max_abs = m * 2^exponent, m in [0.5, 1)
    const int power = 1 - exponent;
    return ldexpf(1.0f, power < -126 ? -126 : power > 126 ? 126 : power);
}

// The norm of the C elements of a row spread over a warp (lane l holds c = l, l + 32, ...).
// Every lane of the warp calls it, with its `lane` (0..31), and gets the result. `load(c, s)`
// returns element c times s, a power of two; it is called twice per element: with s = 1 for
// the row's largest magnitude, then with the row's scale for the squares. At s = 1 an element
// may come out infinite where only its unscaled value exceeds float's range (a difference
// a - b of two large finite values: load it as a * s - b * s where a - b overflows); at the
// row's scale, then 2^-126, it must be finite. Non-finite input gives a non-finite norm.
template <typename Load>
__device__ __forceinline__ ScaledNorm scaled_norm(int lane, int64_t C, const Load& load) {
    float max_abs = 0.0f;
    for (int64_t c = lane; c < C; c += kWarp) max_abs = fmaxf(max_abs, fabsf(load(c, 1.0f)));
    const float scale = norm_scale(warp_max(max_abs));
    float squares = 0.0f;
    for (int64_t c = lane; c < C; c += kWarp) {
        const float x = load(c, scale);
        squares = fmaf(x, x, squares);
    }
    return ScaledNorm{sqrtf(warp_sum(squares)), scale};
}

// The backward of v = d / (n + eps) (spec step 5) for a row of norm n spread over a warp (lane
// l holds c = l, l + 32, ...; every lane calls it): g_d = g/(n+eps) - d (d.g) / (n (n+eps)^2).
// With u = d/n and a = u.g this is
//     g_d = ((g - u a) + u a eps/(n+eps)) / (n+eps),
// the component of g across the row plus what is left of the one along it. Written so, the
// cancellation of the along-row component happens exactly (for C = 1, u = +-1 and g - u a
// is 0 exactly) instead of in the difference of two rounded terms, and no product of small
// numbers underflows; the division by n+eps (not a product with its inverse, subnormal past
// 2^126) keeps large rows precise. Where n == 0 the second term of the spec is 0: g_d = g/eps,
// never NaN. A norm past float's range (inf) makes g_d = 0: the true value, below
// |g|/FLT_MAX, is at most subnormal.
//
// u(c) is the row's direction u_c (the caller knows how to form it best: d_c/n from the rows
// before normalisation, or from normalised rows at their own scale); load_g(c) reads g_c;
// store(c, value) writes g_d[c] and may overwrite g (each lane reads its elements first).
template <typename U, typename LoadG, typename Store>
__device__ __forceinline__ void unit_row_backward(int lane, int64_t C, float norm, const U& u,
                                                  const LoadG& load_g, const Store& store) {
    const float denom = norm + kNormEps;
    if (norm > 0.0f) {
        float along = 0.0f;
        for (int64_t c = lane; c < C; c += kWarp) along = fmaf(u(c), load_g(c), along);
        along = warp_sum(along);
        const float kept = kNormEps / denom;  // eps/(n+eps): what survives along u
        for (int64_t c = lane; c < C; c += kWarp) {
            const float u_along = u(c) * along;
            store(c, ((load_g(c) - u_along) + u_along * kept) / denom);
        }
    } else {
        for (int64_t c = lane; c < C; c += kWarp) store(c, load_g(c) / denom);
    }
}

}  // namespace ccpl
