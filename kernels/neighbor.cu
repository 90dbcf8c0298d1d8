// neighbor.cu: difference rows from feature maps (centre minus neighbour) and their backward.
#include "common.cuh"

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
    const T* feat = ptr<T>(p.feat);
    const int32_t* centers = ptr<int32_t>(p.centers);
    T* rows = mut_ptr<T>(p.rows);
    const int64_t C = p.channels, N = p.num_centers, plane = (int64_t)p.height * p.width;
    const int64_t total = (int64_t)p.batch * N * C;
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < total;
         t += (int64_t)gridDim.x * blockDim.x) {
        const int64_t c = t % C, x = (t / C) % N, b = t / (C * N);
        const int64_t pos = centers[x];
        const float centre = to_float(feat[feat_index(p.layout, b, c, pos, C, plane)]);
        for (int k = 0; k < CCPL_NUM_NEIGHBORS; ++k) {
            const int64_t nb = pos + neighbor_dh(k) * (int64_t)p.width + neighbor_dw(k);
            const float v = centre - to_float(feat[feat_index(p.layout, b, c, nb, C, plane)]);
            rows[(b * CCPL_NUM_NEIGHBORS * N + k * N + x) * C + c] = from_float<T>(v);
        }
    }
}

}  // namespace ccpl

using ccpl::neighbor_diff;
CCPL_KERNELS_PER_DTYPE(neighbor_diff, ccpl_neighbor_diff_params)
