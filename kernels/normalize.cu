// normalize.cu: rows divided by their L2 norm plus epsilon, and the backward of that.
#include "row_norm.cuh"

namespace ccpl {

// out = d / (||d|| + eps), norms = ||d|| (a zero row stays zero), the norm at scale
// (row_norm.cuh): right for rows of any magnitude.
template <typename T> __device__ void normalize_rows(const ccpl_normalize_rows_params& p) {
    const int lane = threadIdx.x % kWarp;
    const int64_t C = p.width;
    for (int64_t row = first_warp_row(); row < p.num_rows; row += warp_row_stride()) {
        const T* __restrict__ d = ptr<T>(p.rows) + row * C;
        T* __restrict__ out = mut_ptr<T>(p.out) + row * C;
        const auto load = [&](int64_t c, float scale) { return to_float(d[c]) * scale; };
        const ScaledNorm norm = scaled_norm(lane, C, load);
        const float factor = norm.unit_factor();
        for (int64_t c = lane; c < C; c += kWarp) out[c] = from_float<T>(load(c, norm.scale) * factor);
        if (lane == 0) mut_ptr<float>(p.norms)[row] = norm.norm();
    }
}

// g_d = g/(n+eps) - d (d.g) / (n (n+eps)^2). With u = d/n and a = u.g this is
//     g_d = ((g - u a) + u a eps/(n+eps)) / (n+eps),
// the component of g across the row plus what is left of the one along it. Written so, the
// cancellation of the along-row component happens exactly (for C = 1, u = +-1 and g - u a
// is 0 exactly) instead of in the difference of two rounded terms, and no product of small
// numbers underflows; the division by n+eps (not a product with its inverse, subnormal past
// 2^126) keeps large rows precise. Where n == 0 the second term of the spec is 0: g_d = g/eps,
// never NaN.
//
// u comes from the rows before normalisation (u = d/n), or with kNormalized from the
// forward's normalised rows v = d/(n+eps), which T holds where it may not hold d: u = v/||v||
// (v is parallel to d), its own norm taken at scale (row_norm.cuh) rather than (n+eps)/n times
// it, so that ||u|| = 1 to float's rounding whatever T's rounding of v: a u longer or shorter
// by e leaks e times the along component into g_d, and for C = 1 that component is all of g.
// (A v that T rounded to zero, of a row far below eps, gives u = 0: g_d = g/(n+eps), off by
// at most n/eps.) A norm past float's range (inf) makes g_d = 0: the true value, below
// |g|/FLT_MAX, is at most subnormal.
template <typename T, bool kNormalized>
__device__ void normalize_rows_backward_rows(const ccpl_normalize_rows_backward_params& p) {
    const int lane = threadIdx.x % kWarp;
    const int64_t C = p.width;
    for (int64_t row = first_warp_row(); row < p.num_rows; row += warp_row_stride()) {
        const T* __restrict__ x = ptr<T>(p.rows) + row * C;
        const T* __restrict__ g = ptr<T>(p.grad_out) + row * C;
        T* __restrict__ grad = mut_ptr<T>(p.grad_rows) + row * C;
        const float norm = ptr<float>(p.norms)[row];
        const float denom = norm + kNormEps;
        if (norm > 0.0f) {
            const auto load = [&](int64_t c, float scale) { return to_float(x[c]) * scale; };
            // u_c = load(c, unit.scale) / unit.scaled: x_c/n, or x_c scaled by the norm of x.
            const ScaledNorm unit = kNormalized ? scaled_norm(lane, C, load) : ScaledNorm{norm, 1.0f};
            const auto u = [&](int64_t c) {
                return unit.scaled > 0.0f ? load(c, unit.scale) / unit.scaled : 0.0f;
            };
            float along = 0.0f;
            for (int64_t c = lane; c < C; c += kWarp) along = fmaf(u(c), to_float(g[c]), along);
            along = warp_sum(along);
            const float kept = kNormEps / denom;  // eps/(n+eps): what survives along u
            for (int64_t c = lane; c < C; c += kWarp) {
                const float u_along = u(c) * along;
                grad[c] = from_float<T>(((to_float(g[c]) - u_along) + u_along * kept) / denom);
            }
        } else {
            for (int64_t c = lane; c < C; c += kWarp) grad[c] = from_float<T>(to_float(g[c]) / denom);
        }
    }
}

template <typename T>
__device__ void normalize_rows_backward(const ccpl_normalize_rows_backward_params& p) {
    bool_switch(p.normalized, [&](auto normalized) {
        normalize_rows_backward_rows<T, decltype(normalized)::value>(p);
    });
}

}  // namespace ccpl

using ccpl::normalize_rows;
using ccpl::normalize_rows_backward;
CCPL_KERNELS_PER_DTYPE(normalize_rows, ccpl_normalize_rows_params)
CCPL_KERNELS_PER_DTYPE(normalize_rows_backward, ccpl_normalize_rows_backward_params)
