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

// The spec's backward (row_norm.cuh's unit_row_backward), a warp per row. u comes from the
// rows before normalisation (u = d/n), or with kNormalized from the forward's normalised rows
// v = d/(n+eps), which T holds where it may not hold d: u = v/||v|| (v is parallel to d), its
// own norm taken at scale (row_norm.cuh) rather than (n+eps)/n times it, so that ||u|| = 1 to
// float's rounding whatever T's rounding of v: a u longer or shorter by e leaks e times the
// along component into g_d, and for C = 1 that component is all of g. (A v that T rounded to
// zero, of a row far below eps, gives u = 0: g_d = g/(n+eps), off by at most n/eps.)
template <typename T, bool kNormalized>
__device__ void normalize_rows_backward_rows(const ccpl_normalize_rows_backward_params& p) {
    const int lane = threadIdx.x % kWarp;
    const int64_t C = p.width;
    for (int64_t row = first_warp_row(); row < p.num_rows; row += warp_row_stride()) {
        const T* __restrict__ x = ptr<T>(p.rows) + row * C;
        const T* __restrict__ g = ptr<T>(p.grad_out) + row * C;
        T* __restrict__ grad = mut_ptr<T>(p.grad_rows) + row * C;
        const float norm = ptr<float>(p.norms)[row];
        const auto load = [&](int64_t c, float scale) { return to_float(x[c]) * scale; };
        // u_c = load(c, unit.scale) / unit.scaled: x_c/n, or x_c scaled by the norm of x.
        const ScaledNorm unit =
            kNormalized && norm > 0.0f ? scaled_norm(lane, C, load) : ScaledNorm{norm, 1.0f};
        unit_row_backward(
            lane, C, norm,
            [&](int64_t c) { return unit.scaled > 0.0f ? load(c, unit.scale) / unit.scaled : 0.0f; },
            [&](int64_t c) { return to_float(g[c]); },
            [&](int64_t c, float v) { grad[c] = from_float<T>(v); });
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
