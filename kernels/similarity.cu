// similarity.cu: logits L[b, i, j] = q[b, i, :] . k[b, j, :] / tau, one 64x64 tile per block,
// blockIdx.z the image; on tensor cores for __half and __nv_bfloat16 (logits_tiles.cuh).
#include "logits_tiles.cuh"

namespace ccpl {

template <typename T> __device__ void similarity(const ccpl_similarity_params& p) {
    const int64_t S = p.shape.rows, C = p.shape.width, b = blockIdx.z;
    const int64_t i0 = (int64_t)blockIdx.y * kTileSide, j0 = (int64_t)blockIdx.x * kTileSide;
    const T* __restrict__ q = ptr<T>(p.q) + b * S * C;
    const T* __restrict__ k = ptr<T>(p.k) + b * S * C;
    float* __restrict__ logits = mut_ptr<float>(p.logits) + b * S * S;
    with_logits_tiles<T>([&](auto& tiles) {
        tiles.compute(q, k, S, C, i0, j0);
        gemm_store(logits, S, S, i0, j0, [&](int i, int j) { return tile_logit(tiles.at(i, j), p.inv_tau); });
    });
}

}  // namespace ccpl

using ccpl::similarity;
CCPL_KERNELS_PER_DTYPE(similarity, ccpl_similarity_params)
