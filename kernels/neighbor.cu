// neighbor.cu: difference rows from feature maps (centre minus neighbour), the same rows
// normalised as they are formed, and the backward scatter.
#include "row_norm.cuh"

namespace ccpl {

// Element (b, c, position) of a feature map in either layout.
__device__ __forceinline__ int64_t feat_index(int layout, int64_t b, int64_t c, int64_t pos,
                                              int64_t channels, int64_t plane) {
    return layout == CCPL_LAYOUT_NCHW ? (b * channels + c) * plane + pos
                                      : (b * plane + pos) * channels + c;
}

// One thread per (b, x, c), c fastest so the row writes are coalesced: it reads the centre
// once and writes that channel of all 8 difference rows of centre x.
template <typename T> __device__ void neighbor_diff(const ccpl_neighbor_diff_params& p) {
    const T* __restrict__ feat = ptr<T>(p.feat);
    const int32_t* __restrict__ centers = ptr<int32_t>(p.centers);
    T* __restrict__ rows = mut_ptr<T>(p.rows);
    const int64_t C = p.channels, N = p.num_centers, plane = (int64_t)p.height * p.width;
    const int64_t total = (int64_t)p.batch * N * C;
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        const int64_t c = t % C, x = (t / C) % N, b = t / (C * N);
        const int64_t pos = centers[x];
        const float centre = to_float(feat[feat_index(p.layout, b, c, pos, C, plane)]);
#pragma unroll
        for (int k = 0; k < CCPL_NUM_NEIGHBORS; ++k) {
            const int64_t nb = pos + neighbor_dh(k) * (int64_t)p.width + neighbor_dw(k);
            const float v = centre - to_float(feat[feat_index(p.layout, b, c, nb, C, plane)]);
            rows[(b * CCPL_NUM_NEIGHBORS * N + k * N + x) * C + c] = from_float<T>(v);
        }
    }
}

// The difference rows normalised (normalize_rows of neighbor_diff) without storing them: one
// warp per row (b, k*N + x), lanes over the channels. The difference is formed in float and
// normalised at scale (row_norm.cuh) before anything is stored in T, so that the normalised
// row is right wherever T holds it: f16 features whose differences pass 65504, f32 and bf16
// features whose differences pass FLT_MAX (formed then at the row's scale, a*s - b*s).
template <typename T>
__device__ void neighbor_diff_normalize(const ccpl_neighbor_diff_normalize_params& p) {
    const T* __restrict__ feat = ptr<T>(p.feat);
    const int32_t* __restrict__ centers = ptr<int32_t>(p.centers);
    const int lane = threadIdx.x % kWarp;
    const int64_t C = p.channels, N = p.num_centers, plane = (int64_t)p.height * p.width;
    const int64_t S = CCPL_NUM_NEIGHBORS * N, total = (int64_t)p.batch * S;
    for (int64_t row = first_warp_row(); row < total; row += warp_row_stride()) {
        const int64_t b = row / S, k = row % S / N, x = row % N;
        const int64_t pos = centers[x];
        const int64_t nb = pos + neighbor_dh((int)k) * (int64_t)p.width + neighbor_dw((int)k);
        const auto load = [&](int64_t c, float scale) {
            const float centre = to_float(feat[feat_index(p.layout, b, c, pos, C, plane)]);
            const float neighbour = to_float(feat[feat_index(p.layout, b, c, nb, C, plane)]);
            const float d = centre - neighbour;
            return isinf(d) ? centre * scale - neighbour * scale : d * scale;
        };
        const ScaledNorm norm = scaled_norm(lane, C, load);
        const float factor = norm.unit_factor();
        T* __restrict__ out = mut_ptr<T>(p.out) + row * C;
        for (int64_t c = lane; c < C; c += kWarp) out[c] = from_float<T>(load(c, norm.scale) * factor);
        if (lane == 0) mut_ptr<float>(p.norms)[row] = norm.norm();
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
    const int32_t* __restrict__ centers = ptr<int32_t>(p.centers);
    T* grad_feat = mut_ptr<T>(p.grad_feat);
    const int64_t C = p.channels, N = p.num_centers, plane = (int64_t)p.height * p.width;
    const int64_t total = (int64_t)p.batch * N * C;
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
            const int64_t nb = pos + neighbor_dh(k) * (int64_t)p.width + neighbor_dw(k);
            atomic_add(&grad_feat[feat_index(p.layout, b, c, nb, C, plane)], -v);
        }
        atomic_add(&grad_feat[feat_index(p.layout, b, c, pos, C, plane)], centre);
    }
}

// Index of the centre at (h, w), or -1 when (h, w) is off the map or holds no centre. The
// bounds are checked in 2D so that a window never wraps from one image row to the next.
__device__ __forceinline__ int center_at(const int32_t* __restrict__ center_map, int h, int w,
                                         int height, int width) {
    return (h >= 0 && h < height && w >= 0 && w < width) ? center_map[h * width + w] : -1;
}

// The neighbour direction k whose window slot is `slot` (constant-folded once unrolled).
__device__ __forceinline__ int direction_of_slot(int slot) {
    int direction = -1;
#pragma unroll
    for (int k = 0; k < CCPL_NUM_NEIGHBORS; ++k) direction = window_slot(k) == slot ? k : direction;
    return direction;
}

// Backward, deterministic: one thread per (b, x, c). A position q of the window of centre x
// may be covered by the windows of several centres; its owner is the smallest centre index
// among them. Only the owner writes q: it adds up, in the fixed order of the window slots,
// every covering centre's contribution (+sum_k g for the centre at q, -g for a centre whose
// neighbour in direction k is q), then adds the sum to the caller's buffer. One writer per
// element and a fixed order: the same bits on every run.
template <typename T>
__device__ void neighbor_diff_backward_deterministic(const ccpl_neighbor_diff_backward_params& p) {
    const T* __restrict__ grad_rows = ptr<T>(p.grad_rows);
    const int32_t* __restrict__ centers = ptr<int32_t>(p.centers);
    const int32_t* __restrict__ center_map = ptr<int32_t>(p.center_map);
    T* __restrict__ grad_feat = mut_ptr<T>(p.grad_feat);
    const int H = p.height, W = p.width;
    const int64_t C = p.channels, N = p.num_centers, plane = (int64_t)H * W;
    const int64_t total = (int64_t)p.batch * N * C;
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        const int64_t c = t % C, b = t / (C * N);
        const int x = (int)((t / C) % N);
        const int pos = centers[x];
        const int h = pos / W, w = pos % W;
        const T* g = grad_rows + b * CCPL_NUM_NEIGHBORS * N * C + c;  // row r at g[r*C]
#pragma unroll
        for (int q_slot = 0; q_slot < 9; ++q_slot) {
            const int qh = h + q_slot / 3 - 1, qw = w + q_slot % 3 - 1;
            // The centre whose window has q in slot s sits at q - (slot s's offset).
            int owner = x;
#pragma unroll
            for (int s = 0; s < 9; ++s) {
                const int y = center_at(center_map, qh - (s / 3 - 1), qw - (s % 3 - 1), H, W);
                if (y >= 0 && y < owner) owner = y;
            }
            if (owner != x) continue;
            float sum = 0.0f;
#pragma unroll
            for (int s = 0; s < 9; ++s) {
                const int y = center_at(center_map, qh - (s / 3 - 1), qw - (s % 3 - 1), H, W);
                if (y < 0) continue;
                if (s == CCPL_CENTER_SLOT) {
#pragma unroll
                    for (int k = 0; k < CCPL_NUM_NEIGHBORS; ++k) sum += to_float(g[(k * N + y) * C]);
                } else {
                    sum -= to_float(g[(direction_of_slot(s) * N + y) * C]);
                }
            }
            T* out = &grad_feat[feat_index(p.layout, b, c, (int64_t)qh * W + qw, C, plane)];
            *out = from_float<T>(to_float(*out) + sum);
        }
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
