// small_s.cu: the whole CCP loss of every layer whose S = 8N is at most CCPL_SMALL_S_MAX_ROWS,
// in three launches per training step, each over every layer (docs/small-s.md):
//
// 1. small_s_gather: the layers' centres drawn on the device (philox.cuh), and the difference
//    rows of both feature maps in float (each row gathered once, not once per block of 2.);
// 2. small_s_rows: per (layer, image, 16 rows): the norms, the logits of the block's rows
//    against all S rows of the other side (kept in shared memory), the cross-entropy, and the
//    gradient of the loss with respect to the block's raw rows, as fused cross-entropy
//    kernels do: the backward's work in the forward pass, for an upstream gradient of 1; the
//    last block sums the losses;
// 3. small_s_scatter: upstream x that gradient into the caller's feature-map gradients.
//
// small_s_rows also serves the rows loss of a learned head (CcpRows), whose backward is then
// small_s_scale. Everything is computed in float from the inputs in T; only the results
// stored in T (the gradients) are rounded. No block waits for another: the closing work of
// a launch is done by the last block to finish (last_block).
#include "neighbor.cuh"
#include "philox.cuh"
#include "row_norm.cuh"
#include "row_stats.cuh"

namespace ccpl {

// The layer of `block`: the last layer whose first block is at most `block` (the layers'
// blocks are consecutive, in layer order).
template <typename Layer>
__device__ __forceinline__ int layer_of_block(const Layer* layers, int num_layers, int block) {
    int layer = 0;
    for (int l = 1; l < num_layers; ++l) layer = layers[l].first_block <= block ? l : layer;
    return layer;
}

// The number of blocks of layer `l`.
template <typename Layer>
__device__ __forceinline__ int layer_blocks(const Layer* layers, int num_layers, int l) {
    const int end = l + 1 < num_layers ? layers[l + 1].first_block : (int)gridDim.x;
    return end - layers[l].first_block;
}

// Whether this block is the last of its launch to get here (every block calls this once,
// after its global writes, and every thread gets the answer). The fence orders this block's
// writes before its count, so the last block sees every other block's; the last block resets
// the count for the next launch (all the others have counted by then).
__device__ __forceinline__ bool last_block(uint32_t* done) {
    __shared__ int is_last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const uint32_t blocks = gridDim.x * gridDim.y * gridDim.z;
        is_last = atomicAdd(done, 1u) == blocks - 1;
        if (is_last) *(volatile uint32_t*)done = 0;
    }
    __syncthreads();
    return is_last != 0;
}

// The 64-bit value at words[0] (low) and words[1] (high), read past the caches: another
// launch wrote it.
__device__ __forceinline__ uint64_t load_u64(const volatile uint32_t* words) {
    return (uint64_t)words[0] | (uint64_t)words[1] << 32;
}

// ---- 1. Centres and difference rows ----------------------------------------------------

// One block draws (or reads) its layer's centres, then gathers its share of the layer's
// (image, centre, channel) items: one thread per item, as neighbor_diff. Drawing: every block
// of a layer draws the same centres from the same stream; the layer's first block draws them
// straight into `centers` (after taking the previous step's out of the map) and keeps the map
// in step, the others draw into shared memory (a layer with more than one block has at most
// CCPL_SMALL_S_MAX_ROWS / 8 centres). The last block to finish advances the step.
template <typename T> __device__ void small_s_gather(const ccpl_small_s_gather_params& p) {
    __shared__ int32_t drawn[CCPL_SMALL_S_MAX_ROWS / CCPL_NUM_NEIGHBORS];
    const int layer = layer_of_block(p.layers, p.num_layers, blockIdx.x);
    const ccpl_small_s_gather_layer& l = p.layers[layer];
    const int N = l.num_centers;
    int32_t* centers = mut_ptr<int32_t>(l.centers);
    uint32_t* counters = mut_ptr<uint32_t>(p.counters);
    const bool writer = (int)blockIdx.x == l.first_block;
    const int32_t* list = centers;
    if (p.sample) {
        const uint64_t seed = load_u64(counters + CCPL_COUNTER_SEED);
        const uint64_t step = load_u64(counters + CCPL_COUNTER_STEP);
        int32_t* map = mut_ptr<int32_t>(l.center_map);
        // Thread t clears and later sets the entries of the centres t, t + blockDim.x, ...;
        // the barriers of draw_centers order every clearing before every setting.
        if (writer) {
            for (int x = threadIdx.x; x < N; x += blockDim.x) map[centers[x]] = -1;
        }
        int32_t* dst = writer ? centers : drawn;
        draw_centers(dst, N, l.height, l.width, CenterStream(seed, step, (uint32_t)layer));
        if (writer) {
            for (int x = threadIdx.x; x < N; x += blockDim.x) map[centers[x]] = x;
        }
        list = dst;
    }
    if (l.feat_q != 0) {
        const T* __restrict__ feat_q = ptr<T>(l.feat_q);
        const T* __restrict__ feat_k = ptr<T>(l.feat_k);
        float* __restrict__ rows_q = mut_ptr<float>(l.rows_q);
        float* __restrict__ rows_k = mut_ptr<float>(l.rows_k);
        const int64_t C = l.channels, total = (int64_t)l.batch * N * C;
        const int64_t stride = (int64_t)layer_blocks(p.layers, p.num_layers, layer) * blockDim.x;
        for (int64_t t = (int64_t)(blockIdx.x - l.first_block) * blockDim.x + threadIdx.x; t < total;
             t += stride) {
            const int64_t c = t % C, x = (t / C) % N, b = t / (C * N);
            const int64_t row0 = (b * CCPL_NUM_NEIGHBORS * N + x) * C + c;  // row k*N + x at row0 + k*N*C
            const auto store_q = [&](int k, float v) { rows_q[row0 + k * N * C] = v; };
            const auto store_k = [&](int k, float v) { rows_k[row0 + k * N * C] = v; };
            difference_rows(feat_q, l.layout, b, c, list[x], C, l.height, l.width, store_q);
            difference_rows(feat_k, l.layout, b, c, list[x], C, l.height, l.width, store_k);
        }
    }
    if (p.sample && last_block(counters + CCPL_COUNTER_GATHER_DONE) && threadIdx.x == 0) {
        const uint64_t next = load_u64(counters + CCPL_COUNTER_STEP) + 1;
        counters[CCPL_COUNTER_STEP] = (uint32_t)next;
        counters[CCPL_COUNTER_STEP + 1] = (uint32_t)(next >> 32);
    }
}

// ---- 2. The rows loss and the gradient of the rows --------------------------------------

constexpr int kTileRows = CCPL_SMALL_S_TILE_ROWS;  // the rows a block owns
constexpr int kMaxRows = CCPL_SMALL_S_MAX_ROWS;    // S at most
constexpr int kSplits = 4;                         // groups of threads splitting a reduction
constexpr int kGroup = CCPL_SMALL_S_BLOCK / kSplits;
constexpr int kTileCols = 64;   // a product's output tile is kTileRows x kTileCols
constexpr int kMicro = 4;       // each thread of a group: kMicro x kMicro outputs
constexpr int kDepth = 32;      // reduction depth staged per step, kDepth / kSplits a group
constexpr int kMicroCols = kTileCols / kMicro;
static_assert(kGroup == (kTileRows / kMicro) * kMicroCols, "a group's micro-tiles cover the tile");
static_assert(kDepth % kSplits == 0, "the groups split a stage evenly");

// The static shared memory of small_s_rows (47.6 KB of the 48 KB a block may have without
// opting in): the block's rows of logits against all S rows of the other side, then of G
// (32 KB at S = 512: what bounds S), the norms, and the operands of the products.
struct SmallShared {
    float logits[kTileRows][kMaxRows];
    float other_scale[kMaxRows];  // 1 / (||other row j|| + eps)
    float own_norm[kTileRows];
    float row_loss[kTileRows];
    float scratch[kWarp];
    union {
        struct {
            float a[kDepth][kTileRows + 1];  // padded: the stores along k are conflict-free
            float b[kDepth][kTileCols + 1];
        } stage;
        float partial[kSplits - 1][kTileRows][kTileCols + 1];  // groups 1.. of a product
    };
};

// out(m, n, A B [m][n]) for the block's kTileRows x kTileCols tile of A B over k in
// [0, depth): load_a(m, k) and load_b(k, n) give the operands (0 outside the matrices).
// Each group of kGroup threads reduces its quarter of every kDepth-deep stage into
// kMicro x kMicro accumulators a thread (rows ty + 4i, columns tx + 16j); group 0 then adds
// the other groups' sums in a fixed order and calls out, so the result does not depend on
// scheduling, and A B and B A hold the same bits (fmaf is commutative). kBAlongK: consecutive
// threads load consecutive k of B (true) or consecutive n (false), whichever is contiguous
// in memory. Every thread of the block calls this; it begins and ends with the shared
// operands free.
template <bool kBAlongK, typename LoadA, typename LoadB, typename Out>
__device__ __forceinline__ void small_tile(SmallShared& s, int64_t depth, const LoadA& load_a,
                                           const LoadB& load_b, const Out& out) {
    const int group = threadIdx.x / kGroup, u = threadIdx.x % kGroup;
    const int ty = u / kMicroCols, tx = u % kMicroCols;
    float acc[kMicro][kMicro] = {};
    for (int64_t k0 = 0; k0 < depth; k0 += kDepth) {
        for (int e = threadIdx.x; e < kTileRows * kDepth; e += blockDim.x) {
            const int m = e / kDepth, kk = e % kDepth;
            s.stage.a[kk][m] = load_a(m, k0 + kk);
        }
        for (int e = threadIdx.x; e < kTileCols * kDepth; e += blockDim.x) {
            const int n = kBAlongK ? e / kDepth : e % kTileCols;
            const int kk = kBAlongK ? e % kDepth : e / kTileCols;
            s.stage.b[kk][n] = load_b(k0 + kk, n);
        }
        __syncthreads();
        const int k_begin = group * (kDepth / kSplits);
        for (int kk = k_begin; kk < k_begin + kDepth / kSplits; ++kk) {
            float a[kMicro], b[kMicro];
#pragma unroll
            for (int i = 0; i < kMicro; ++i) a[i] = s.stage.a[kk][ty + (kTileRows / kMicro) * i];
#pragma unroll
            for (int j = 0; j < kMicro; ++j) b[j] = s.stage.b[kk][tx + kMicroCols * j];
#pragma unroll
            for (int i = 0; i < kMicro; ++i)
#pragma unroll
                for (int j = 0; j < kMicro; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
    const auto row = [&](int i) { return ty + (kTileRows / kMicro) * i; };
    const auto col = [&](int j) { return tx + kMicroCols * j; };
    if (group > 0) {
#pragma unroll
        for (int i = 0; i < kMicro; ++i)
#pragma unroll
            for (int j = 0; j < kMicro; ++j) s.partial[group - 1][row(i)][col(j)] = acc[i][j];
    }
    __syncthreads();
    if (group == 0) {
#pragma unroll
        for (int i = 0; i < kMicro; ++i) {
#pragma unroll
            for (int j = 0; j < kMicro; ++j) {
                float v = acc[i][j];
#pragma unroll
                for (int g = 0; g < kSplits - 1; ++g) v += s.partial[g][row(i)][col(j)];
                out(row(i), col(j), v);
            }
        }
    }
    __syncthreads();
}

// The logit of q row i and k row j from their raw product and the inverse norms plus eps of
// both: one expression, whichever side the block owns, so the transposed launch recomputes
// the forward's logits exactly.
__device__ __forceinline__ float small_logit(float raw, float q_scale, float k_scale, float inv_tau) {
    return __fmul_rn(__fmul_rn(__fmul_rn(raw, q_scale), k_scale), inv_tau);
}

// One block: layer `layer`, image b, own rows r0 .. r0 + 15. Forward (kTranspose false): own
// rows are rows_q, the other side rows_k; the block writes its rows' lse and loss, and the
// gradient of the loss (upstream 1) with respect to its raw rows of q. Transposed: own rows
// are rows_k, the other side rows_q; the gradient with respect to the block's raw rows of k,
// from the forward's lse and row loss.
template <typename T, bool kTranspose>
__device__ void small_s_rows_block(const ccpl_small_s_rows_params& p, SmallShared& s) {
    const int layer = layer_of_block(p.layers, p.num_layers, blockIdx.x);
    const ccpl_small_s_rows_layer& l = p.layers[layer];
    const int64_t S = l.rows, C = l.width;
    const int64_t tiles = (S + kTileRows - 1) / kTileRows;
    const int64_t local = blockIdx.x - l.first_block;
    const int64_t b = local / tiles, r0 = local % tiles * kTileRows;
    const T* __restrict__ own = ptr<T>(kTranspose ? l.rows_k : l.rows_q) + b * S * C;
    const T* __restrict__ other = ptr<T>(kTranspose ? l.rows_q : l.rows_k) + b * S * C;
    float* __restrict__ grad = mut_ptr<float>(l.grad_rows) + b * S * C;
    float* __restrict__ row_lse = mut_ptr<float>(l.row_lse) + b * S;
    float* __restrict__ row_loss = mut_ptr<float>(l.row_loss) + b * S;
    float* __restrict__ copy_q = kTranspose ? nullptr : mut_ptr<float>(l.copy_q);
    float* __restrict__ copy_k = kTranspose ? nullptr : mut_ptr<float>(l.copy_k);
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    const int warps = blockDim.x / kWarp;

    // Norms: a warp per row, own rows first, then all S rows of the other side. The forward
    // of the rows loss copies the rows of q and k it owns, for a later transposed launch.
    for (int64_t r = warp; r < kTileRows + S; r += warps) {
        const bool mine = r < kTileRows;
        const int64_t i = mine ? r0 + r : r - kTileRows;
        if (i >= S) {
            if (lane == 0) s.own_norm[r] = 0.0f;
            continue;
        }
        const T* row = (mine ? own : other) + i * C;
        const float norm =
            scaled_norm(lane, C, [&](int64_t c, float scale) { return to_float(row[c]) * scale; }).norm();
        if (lane == 0) {
            if (mine) s.own_norm[r] = norm;
            else s.other_scale[i] = 1.0f / (norm + kNormEps);
        }
        float* copy = mine ? copy_q : (i >= r0 && i < r0 + kTileRows ? copy_k : nullptr);
        if (copy != nullptr) {
            for (int64_t c = lane; c < C; c += kWarp) copy[(b * S + i) * C + c] = to_float(row[c]);
        }
    }
    __syncthreads();

    // Raw logits, 64 columns of the other side at a time.
    for (int64_t j0 = 0; j0 < S; j0 += kTileCols) {
        small_tile<true>(
            s, C,
            [&](int m, int64_t c) { return r0 + m < S && c < C ? to_float(own[(r0 + m) * C + c]) : 0.0f; },
            [&](int64_t c, int n) { return j0 + n < S && c < C ? to_float(other[(j0 + n) * C + c]) : 0.0f; },
            [&](int m, int n, float v) {
                if (j0 + n < S) s.logits[m][j0 + n] = v;
            });
    }

    // The cross-entropy of each own row (forward), and the block's rows of G scaled for the
    // product with the other side's raw rows: H = (P - I) / (B S tau) / (||other row|| + eps),
    // where P - I is taken at (own i, other j) in the forward and at (other j, own i), the
    // softmax row of q_j, in the transposed launch. A warp per own row.
    const float inv_tau = p.inv_tau;
    const float inv_count = 1.0f / (float)(l.batch * S);
    const float coeff = inv_tau * inv_count;
    for (int m = warp; m < kTileRows; m += warps) {
        const int64_t i = r0 + m;
        if (i >= S) {
            for (int64_t j = lane; j < S; j += kWarp) s.logits[m][j] = 0.0f;
            if (lane == 0) s.row_loss[m] = 0.0f;
            continue;
        }
        const float own_scale = 1.0f / (s.own_norm[m] + kNormEps);
        const auto logit = [&](int64_t j) {
            const float raw = s.logits[m][j];
            return kTranspose ? small_logit(raw, s.other_scale[j], own_scale, inv_tau)
                              : small_logit(raw, own_scale, s.other_scale[j], inv_tau);
        };
        if (kTranspose) {
            for (int64_t j = lane; j < S; j += kWarp) {
                const float g = softmax_minus_eye(j == i, logit(j), row_lse[j], row_loss[j]);
                s.logits[m][j] = g * coeff * s.other_scale[j];
            }
            continue;
        }
        RowStats stats = row_stats_empty();
        float diagonal = 0.0f;
        for (int64_t j = lane; j < S; j += kWarp) {
            const float x = logit(j);
            row_stats_push(stats, x);
            if (j == i) diagonal = x;
        }
        for (int o = kWarp / 2; o > 0; o /= 2) {
            const RowStats other_lanes{__shfl_xor_sync(kFullMask, stats.max, o),
                                       __shfl_xor_sync(kFullMask, stats.rest, o)};
            stats = row_stats_merge(stats, other_lanes);
        }
        diagonal = __shfl_sync(kFullMask, diagonal, (int)(i % kWarp));
        const float log_sum = log1pf(stats.rest);
        const float lse = stats.max + log_sum;
        const float loss = (stats.max - diagonal) + log_sum;
        if (lane == 0) {
            row_lse[i] = lse;
            row_loss[i] = loss;
            s.row_loss[m] = loss;
        }
        for (int64_t j = lane; j < S; j += kWarp) {
            const float g = softmax_minus_eye(j == i, logit(j), lse, loss);
            s.logits[m][j] = g * coeff * s.other_scale[j];
        }
    }
    __syncthreads();

    // The gradient of the own unit rows, H times the other side's raw rows, 64 columns at a
    // time, into grad.
    for (int64_t c0 = 0; c0 < C; c0 += kTileCols) {
        small_tile<false>(
            s, S, [&](int m, int64_t j) { return j < S ? s.logits[m][j] : 0.0f; },
            [&](int64_t j, int n) { return j < S && c0 + n < C ? to_float(other[j * C + c0 + n]) : 0.0f; },
            [&](int m, int n, float v) {
                if (r0 + m < S && c0 + n < C) grad[(r0 + m) * C + c0 + n] = v;
            });
    }

    // Back through the normalisation, in place (the block's own writes, visible after the
    // barrier that ends small_tile).
    for (int m = warp; m < kTileRows; m += warps) {
        const int64_t i = r0 + m;
        if (i >= S) continue;
        const T* row = own + i * C;
        float* g = grad + i * C;
        const float norm = s.own_norm[m];
        unit_row_backward(
            lane, C, norm, [&](int64_t c) { return to_float(row[c]) / norm; },
            [&](int64_t c) { return g[c]; }, [&](int64_t c, float v) { g[c] = v; });
    }
    if (kTranspose) return;

    // The block's share of its layer's loss, each row loss divided by B S before the sum (no
    // overflow where the mean fits); the last block sums each layer's shares, then the layers,
    // in a fixed order.
    float* partials = mut_ptr<float>(p.partials);
    if (threadIdx.x == 0) {
        float sum = 0.0f;
        for (int m = 0; m < kTileRows; ++m) sum += s.row_loss[m] * inv_count;
        partials[blockIdx.x] = sum;
    }
    if (!last_block(mut_ptr<uint32_t>(p.counters) + CCPL_COUNTER_ROWS_DONE)) return;
    const volatile float* shares = partials;
    float total = 0.0f;
    for (int k = 0; k < p.num_layers; ++k) {
        const int first = p.layers[k].first_block, count = layer_blocks(p.layers, p.num_layers, k);
        float sum = 0.0f;
        for (int e = threadIdx.x; e < count; e += blockDim.x) sum += shares[first + e];
        sum = block_sum(sum, s.scratch);
        if (threadIdx.x == 0) {
            mut_ptr<float>(p.layer_loss)[k] = sum;
            total += sum;
        }
    }
    if (threadIdx.x == 0) mut_ptr<float>(p.loss)[0] = total;
}

template <typename T> __device__ void small_s_rows(const ccpl_small_s_rows_params& p) {
    __shared__ SmallShared s;
    bool_switch(p.transpose, [&](auto transpose) { small_s_rows_block<T, decltype(transpose)::value>(p, s); });
}

// ---- 3. The scatter into the feature maps' gradients, and the rows' backward --------------

// One thread per (side, image, centre, channel) of every layer, as
// neighbor_diff_backward_deterministic, scaled by the upstream gradient: the same bits on
// every run.
template <typename T> __device__ void small_s_scatter(const ccpl_small_s_scatter_params& p) {
    const int layer = layer_of_block(p.layers, p.num_layers, blockIdx.x);
    const ccpl_small_s_scatter_layer& l = p.layers[layer];
    const bool k_side = blockIdx.y == 1;
    T* __restrict__ grad_feat = mut_ptr<T>(k_side ? l.grad_feat_k : l.grad_feat_q);
    if (grad_feat == nullptr) return;
    const float* __restrict__ grad_rows = ptr<float>(k_side ? l.grad_rows_k : l.grad_rows_q);
    const int32_t* __restrict__ centers = ptr<int32_t>(l.centers);
    const float upstream = ptr<float>(p.upstream)[0];
    const int64_t C = l.channels, N = l.num_centers, plane = (int64_t)l.height * l.width;
    const int64_t total = (int64_t)l.batch * N * C;
    const int64_t stride = (int64_t)layer_blocks(p.layers, p.num_layers, layer) * blockDim.x;
    for (int64_t t = (int64_t)(blockIdx.x - l.first_block) * blockDim.x + threadIdx.x; t < total;
         t += stride) {
        const int64_t c = t % C, b = t / (C * N);
        const int x = (int)((t / C) % N);
        const float* g = grad_rows + b * CCPL_NUM_NEIGHBORS * N * C + c;  // row r at g[r*C]
        scatter_window(
            ptr<int32_t>(l.center_map), l.height, l.width, l.num_centers, x, centers[x],
            [&](int64_t r) { return g[r * C]; },
            [&](int64_t q, float sum) {
                T* out = &grad_feat[feat_index(l.layout, b, c, q, C, plane)];
                *out = from_float<T>(to_float(*out) + upstream * sum);
            });
    }
}

// out = upstream * grad_rows in T, blockIdx.y the side: the rows loss's backward.
template <typename T> __device__ void small_s_scale(const ccpl_small_s_scale_params& p) {
    const bool k_side = blockIdx.y == 1;
    T* __restrict__ out = mut_ptr<T>(k_side ? p.out_k : p.out_q);
    if (out == nullptr) return;
    const float* __restrict__ grad_rows = ptr<float>(k_side ? p.grad_rows_k : p.grad_rows_q);
    const float upstream = ptr<float>(p.upstream)[0];
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.count;
         i += (int64_t)gridDim.x * blockDim.x) {
        out[i] = from_float<T>(upstream * grad_rows[i]);
    }
}

}  // namespace ccpl

using ccpl::small_s_gather;
using ccpl::small_s_rows;
using ccpl::small_s_scale;
using ccpl::small_s_scatter;
CCPL_KERNELS_PER_DTYPE(small_s_gather, ccpl_small_s_gather_params)
CCPL_KERNELS_PER_DTYPE(small_s_rows, ccpl_small_s_rows_params)
CCPL_KERNELS_PER_DTYPE(small_s_scatter, ccpl_small_s_scatter_params)
CCPL_KERNELS_PER_DTYPE(small_s_scale, ccpl_small_s_scale_params)
