// neighbor.cuh: the difference rows of one (image, centre, channel), a difference row
// normalised as it is formed, and the deterministic scatter of their gradient, shared by
// neighbor.cu (one layer, rows in T) and small_s.cu (every layer in one launch, rows in float).
#pragma once

#include "common.cuh"
#include "row_norm.cuh"

namespace ccpl {

// Element (b, c, position h*W + w) of a feature map: the one place its layout is read.
__device__ __forceinline__ int64_t feature_index(const ccpl_feature_map& f, int64_t b, int64_t c,
                                                 int64_t pos) {
    const int64_t plane = (int64_t)f.height * f.width;
    return f.layout == CCPL_LAYOUT_NCHW ? (b * f.channels + c) * plane + pos
                                        : (b * plane + pos) * f.channels + c;
}

// The position of neighbour k of the position `pos` of a feature map.
__device__ __forceinline__ int64_t neighbor_position(const ccpl_feature_map& f, int64_t pos, int k) {
    return pos + neighbor_dh(k) * (int64_t)f.width + neighbor_dw(k);
}

// Channel c of the 8 difference rows of the centre at `pos` in image b (centre minus
// neighbour k), given to store(k, value): the centre is read once.
template <typename T, typename Store>
__device__ __forceinline__ void difference_rows(const T* __restrict__ feat, const ccpl_feature_map& f,
                                                int64_t b, int64_t c, int64_t pos,
                                                const Store& store) {
    const float centre = to_float(feat[feature_index(f, b, c, pos)]);
#pragma unroll
    for (int k = 0; k < CCPL_NUM_NEIGHBORS; ++k) {
        const int64_t nb = neighbor_position(f, pos, k);
        store(k, centre - to_float(feat[feature_index(f, b, c, nb)]));
    }
}

// The difference row of image b in direction k of the centre at `pos` (d = f[b, :, pos] -
// f[b, :, pos + off_k]) normalised, without storing d: formed in float and normalised at its
// scale (row_norm.cuh), so that the normalised row is right wherever d is not representable
// (f16 features whose differences pass 65504 when d would be stored in T; f32 and bf16
// features whose differences pass FLT_MAX, formed then at the row's scale, a*s - b*s). A warp
// per row: every lane calls it with its `lane`; store(c, v) receives the lane's elements
// c = lane, lane + 32, ... of d / (||d|| + eps); every lane gets ||d|| (inf past float's range).
template <typename T, typename Store>
__device__ __forceinline__ float normalized_difference_row(const T* __restrict__ feat,
                                                           const ccpl_feature_map& f, int64_t b,
                                                           int k, int64_t pos, int lane,
                                                           const Store& store) {
    const int64_t channels = f.channels;
    const int64_t nb = neighbor_position(f, pos, k);
    const auto load = [&](int64_t c, float scale) {
        const float centre = to_float(feat[feature_index(f, b, c, pos)]);
        const float neighbour = to_float(feat[feature_index(f, b, c, nb)]);
        const float d = centre - neighbour;
        return isinf(d) ? centre * scale - neighbour * scale : d * scale;
    };
    const ScaledNorm norm = scaled_norm(lane, channels, load);
    const float factor = norm.unit_factor();
    for (int64_t c = lane; c < channels; c += kWarp) store(c, load(c, norm.scale) * factor);
    return norm.norm();
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

// The deterministic scatter of one (image, centre x, channel) of feature map f: a position q
// of the window of centre x may be covered by the windows of several centres; its owner is
// the smallest centre index among them. Only the owner writes q: it adds up, in the fixed
// order of the window slots, every covering centre's contribution (+sum_k g for the centre at
// q, -g for a centre whose neighbour in direction k is q) and gives the sum to add(position of
// q, sum). grad(r) is the gradient of difference row r = k*N + y at this image and channel.
// One writer per element and a fixed order: the same bits on every run.
template <typename Grad, typename Add>
__device__ __forceinline__ void scatter_window(const ccpl_feature_map& f, const ccpl_centers& centers,
                                               int x, const Grad& grad, const Add& add) {
    const int32_t* __restrict__ center_map = ptr<int32_t>(centers.map);
    const int height = f.height, width = f.width, num_centers = centers.count;
    const int pos = ptr<int32_t>(centers.flat)[x];
    const int h = pos / width, w = pos % width;
#pragma unroll
    for (int q_slot = 0; q_slot < 9; ++q_slot) {
        const int qh = h + q_slot / 3 - 1, qw = w + q_slot % 3 - 1;
        // The centre whose window has q in slot s sits at q - (slot s's offset).
        int owner = x;
#pragma unroll
        for (int s = 0; s < 9; ++s) {
            const int y = center_at(center_map, qh - (s / 3 - 1), qw - (s % 3 - 1), height, width);
            if (y >= 0 && y < owner) owner = y;
        }
        if (owner != x) continue;
        float sum = 0.0f;
#pragma unroll
        for (int s = 0; s < 9; ++s) {
            const int y = center_at(center_map, qh - (s / 3 - 1), qw - (s % 3 - 1), height, width);
            if (y < 0) continue;
            if (s == CCPL_CENTER_SLOT) {
#pragma unroll
                for (int k = 0; k < CCPL_NUM_NEIGHBORS; ++k) sum += grad((int64_t)k * num_centers + y);
            } else {
                sum -= grad((int64_t)direction_of_slot(s) * num_centers + y);
            }
        }
        add((int64_t)qh * width + qw, sum);
    }
}

}  // namespace ccpl
