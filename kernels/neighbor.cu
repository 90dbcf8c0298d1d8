// neighbor.cu: difference rows from feature maps (centre minus neighbour), the same rows
// normalised as they are formed, and the backward scatter.
#include "neighbor.cuh"

namespace ccpl {

// One thread per (b, x, c), c fastest so the row writes are coalesced: it reads the centre
// once and writes that channel of all 8 difference rows of centre x.
template <typename T> __device__ void neighbor_diff(const ccpl_neighbor_diff_params& p) {
    const T* __restrict__ feat = ptr<T>(p.feat);
    const int32_t* __restrict__ centers = ptr<int32_t>(p.centers.flat);
    T* __restrict__ rows = mut_ptr<T>(p.rows);
    const int64_t C = p.shape.channels, N = p.centers.count;
    const int64_t total = (int64_t)p.shape.batch * N * C;
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        const int64_t c = t % C, x = (t / C) % N, b = t / (C * N);
        difference_rows(feat, p.shape, b, c, centers[x], [&](int k, float v) {
            rows[(b * CCPL_NUM_NEIGHBORS * N + k * N + x) * C + c] = from_float<T>(v);
        });
    }
}

// The difference rows normalised (normalize_rows of neighbor_diff) without storing them: one
// warp per row (b, k*N + x), lanes over the channels (normalized_difference_row: the
// normalised row is right wherever T holds it, whatever the difference).
template <typename T>
__device__ void neighbor_diff_normalize(const ccpl_neighbor_diff_normalize_params& p) {
    const T* __restrict__ feat = ptr<T>(p.feat);
    const int32_t* __restrict__ centers = ptr<int32_t>(p.centers.flat);
    const int lane = threadIdx.x % kWarp;
    const int64_t C = p.shape.channels, N = p.centers.count;
    const int64_t S = CCPL_NUM_NEIGHBORS * N, total = (int64_t)p.shape.batch * S;
    for (int64_t row = first_warp_row(); row < total; row += warp_row_stride()) {
        const int64_t b = row / S, k = row % S / N, x = row % N;
        T* __restrict__ out = mut_ptr<T>(p.out) + row * C;
        const float norm = normalized_difference_row(
            feat, p.shape, b, (int)k, centers[x], lane,
            [&](int64_t c, float v) { out[c] = from_float<T>(v); });
        if (lane == 0) mut_ptr<float>(p.norms)[row] = norm;
    }
}

// Adds v to *addr atomically: float natively; __half (sm_70+) and __nv_bfloat16 (sm_80+)
// through their own atomicAdd, so v is rounded to T once.
template <typename T> __device__ __forceinline__ void atomic_add(T* addr, float v) {
    atomicAdd(addr, from_float<T>(v));
}

// Backward, atomic: one thread per (b, x, c). The centre gets the sum of its 8 gradients
// (summed in float, then one atomic add), each neighbour gets -g. Overlapping windows meet
// in the atomics, so the order of additions (and the last bits) varies from run to run.
template <typename T>
__device__ void neighbor_diff_backward_atomic(const ccpl_neighbor_diff_backward_params& p) {
    const T* __restrict__ grad_rows = ptr<T>(p.grad_rows);
    const int32_t* __restrict__ centers = ptr<int32_t>(p.centers.flat);
    T* grad_feat = mut_ptr<T>(p.grad_feat);
    const int64_t C = p.shape.channels, N = p.centers.count;
    const int64_t total = (int64_t)p.shape.batch * N * C;
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        const int64_t c = t % C, x = (t / C) % N, b = t / (C * N);
        const int64_t pos = centers[x];
        const T* g = grad_rows + (b * CCPL_NUM_NEIGHBORS * N + x) * C + c;  // row k*N + x at g[k*N*C]
        float centre = 0.0f;
#pragma unroll
        for (int k = 0; k < CCPL_NUM_NEIGHBORS; ++k) {
            const float v = to_float(g[k * N * C]);
            centre += v;
            atomic_add(&grad_feat[feature_index(p.shape, b, c, neighbor_position(p.shape, pos, k))], -v);
        }
        atomic_add(&grad_feat[feature_index(p.shape, b, c, pos)], centre);
    }
}

// Backward, deterministic: one thread per (b, x, c), each the owner of the positions of its
// window that no smaller centre index covers (scatter_window).
template <typename T>
__device__ void neighbor_diff_backward_deterministic(const ccpl_neighbor_diff_backward_params& p) {
    const T* __restrict__ grad_rows = ptr<T>(p.grad_rows);
    T* __restrict__ grad_feat = mut_ptr<T>(p.grad_feat);
    const int64_t C = p.shape.channels, N = p.centers.count;
    const int64_t total = (int64_t)p.shape.batch * N * C;
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        const int64_t c = t % C, b = t / (C * N);
        const int x = (int)((t / C) % N);
        const T* g = grad_rows + b * CCPL_NUM_NEIGHBORS * N * C + c;  // row r at g[r*C]
        scatter_window(
            p.shape, p.centers, x, [&](int64_t r) { return to_float(g[r * C]); },
            [&](int64_t q, float sum) {
                T* out = &grad_feat[feature_index(p.shape, b, c, q)];
                *out = from_float<T>(to_float(*out) + sum);
            });
    }
}

}  // namespace ccpl

using ccpl::neighbor_diff;
using ccpl::neighbor_diff_normalize;
using ccpl::neighbor_diff_backward_atomic;
using ccpl::neighbor_diff_backward_deterministic;
CCPL_KERNELS_PER_DTYPE(neighbor_diff, ccpl_neighbor_diff_params)
CCPL_KERNELS_PER_DTYPE(neighbor_diff_normalize, ccpl_neighbor_diff_normalize_params)
CCPL_KERNELS_PER_DTYPE(neighbor_diff_backward_atomic, ccpl_neighbor_diff_backward_params)
CCPL_KERNELS_PER_DTYPE(neighbor_diff_backward_deterministic, ccpl_neighbor_diff_backward_params)
