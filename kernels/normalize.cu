// normalize.cu: rows divided by their L2 norm plus epsilon, and the backward of that.
#include "row_norm.cuh"

namespace ccpl {

// Rows are spread over warps, one warp per row: lanes stride over the row (coalesced for any
// width, C = 1 included) and reduce with shuffles, so a row needs no shared memory and no
// barrier. The loop bound is the same for the whole warp, as the shuffles require.
__device__ __forceinline__ int64_t first_warp_row() {
    return ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / kWarp;
}
__device__ __forceinline__ int64_t warp_row_stride() {
    return (int64_t)gridDim.x * blockDim.x / kWarp;
}

// out = d / (||d|| + eps), norms = ||d|| (a zero row stays zero).
template <typename T> __device__ void normalize_rows(const ccpl_normalize_rows_params& p) {
    const int lane = threadIdx.x % kWarp;
    const int64_t C = p.width;
    for (int64_t row = first_warp_row(); row < p.num_rows; row += warp_row_stride()) {
        const T* __restrict__ d = ptr<T>(p.rows) + row * C;
        T* __restrict__ out = mut_ptr<T>(p.out) + row * C;
        float squares = 0.0f;
        for (int64_t c = lane; c < C; c += kWarp) {
            const float v = to_float(d[c]);
            squares = fmaf(v, v, squares);
        }
        const float norm = sqrtf(warp_sum(squares));
        const float scale = 1.0f / (norm + kNormEps);
        for (int64_t c = lane; c < C; c += kWarp) out[c] = from_float<T>(to_float(d[c]) * scale);
        if (lane == 0) mut_ptr<float>(p.norms)[row] = norm;
    }
}

// The spec's backward (row_norm.cuh), a warp per row.
template <typename T>
__device__ void normalize_rows_backward(const ccpl_normalize_rows_backward_params& p) {
    const int64_t C = p.width;
    for (int64_t row = first_warp_row(); row < p.num_rows; row += warp_row_stride()) {
        const T* __restrict__ d = ptr<T>(p.rows) + row * C;
        const T* __restrict__ g = ptr<T>(p.grad_out) + row * C;
        T* __restrict__ grad = mut_ptr<T>(p.grad_rows) + row * C;
        warp_unit_row_backward(
            C, ptr<float>(p.norms)[row], [&](int64_t c) { return to_float(d[c]); },
            [&](int64_t c) { return to_float(g[c]); },
            [&](int64_t c, float v) { grad[c] = from_float<T>(v); });
    }
}

}  // namespace ccpl

using ccpl::normalize_rows;
using ccpl::normalize_rows_backward;
CCPL_KERNELS_PER_DTYPE(normalize_rows, ccpl_normalize_rows_params)
CCPL_KERNELS_PER_DTYPE(normalize_rows_backward, ccpl_normalize_rows_backward_params)
