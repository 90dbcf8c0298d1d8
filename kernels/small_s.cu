// small_s.cu: the whole CCP loss of every layer whose S = 8N is at most CCPL_SMALL_S_MAX_ROWS,
// in three launches per training step, each over every layer (docs/small-s.md):
//
// 1. small_s_gather: the layers' centres drawn on the device (philox.cuh), and the difference
//    rows of both feature maps normalised in float, with their norms (each row gathered once,
//    not once per block of 2.; no difference row stored, so none overflows); or, for a learned
//    head, which runs between 1. and 2. on them, the raw difference rows in T;
// 2. small_s_rows: per (layer, image, 16 rows): the logits of the block's rows against all S
//    rows of the other side (kept in shared memory), the cross-entropy, and the gradient of
//    the loss with respect to the block's rows, as fused cross-entropy kernels do: the
//    backward's work in the forward pass, for an upstream gradient of 1; the last block sums
//    the losses in double;
// 3. small_s_scatter: upstream x that gradient into the caller's feature-map gradients.
//
// small_s_rows also serves the rows loss of a learned head (CcpRows), on its raw rows, which
// it normalises at their scale (row_norm.cuh); its backward is then small_s_scale, and the
// gradient of the gather's raw rows (through the head) goes back through small_s_scatter.
// Everything is computed in float from the inputs in T; only the results stored in T (the
// gradients, the raw rows) are rounded. No block waits for another: the closing work of a
// launch is done by the last block to finish (last_block).
#include "neighbor.cuh"
#include "philox.cuh"
#include "row_stats.cuh"
#include "split_gemm.cuh"

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

// The normalised rows (the identity head's loss): a warp per difference row of either side
// (q's rows, then k's), as neighbor_diff_normalize, normalised as it is formed: a difference
// that float cannot hold (features near FLT_MAX) is never stored. `list`: the layer's centres.
template <typename T>
__device__ void gather_normalized_rows(const ccpl_small_s_gather_params& p, int layer,
                                       const int32_t* list) {
    const ccpl_small_s_gather_layer& l = p.layers[layer];
    const int64_t C = l.shape.channels, N = l.centers.count, S = CCPL_NUM_NEIGHBORS * N;
    const int64_t rows = (int64_t)l.shape.batch * S;  // of one side
    const int lane = threadIdx.x % kWarp;
    const int64_t warps = (int64_t)layer_blocks(p.layers, p.num_layers, layer) * blockDim.x / kWarp;
    for (int64_t r = ((int64_t)(blockIdx.x - l.first_block) * blockDim.x + threadIdx.x) / kWarp;
         r < 2 * rows; r += warps) {
        const bool k_side = r >= rows;
        const int64_t row = k_side ? r - rows : r;
        const int64_t b = row / S, k = row % S / N, x = row % N;
        float* __restrict__ out = mut_ptr<float>(k_side ? l.rows_k : l.rows_q) + row * C;
        const float norm = normalized_difference_row(
            ptr<T>(k_side ? l.feat_k : l.feat_q), l.shape, b, (int)k, list[x], lane,
            [&](int64_t c, float v) { out[c] = v; });
        if (lane == 0) mut_ptr<float>(k_side ? l.norms_k : l.norms_q)[row] = norm;
    }
}

// The raw rows (a learned head's input): a thread per (side, image, centre, channel), as
// neighbor_diff: it reads the centre once and stores that channel of the centre's 8 difference
// rows in T, formed in float and rounded once (the same values and layout as neighbor_diff's).
template <typename T>
__device__ void gather_raw_rows(const ccpl_small_s_gather_params& p, int layer,
                                const int32_t* list) {
    const ccpl_small_s_gather_layer& l = p.layers[layer];
    const int64_t C = l.shape.channels, N = l.centers.count;
    const int64_t items = (int64_t)l.shape.batch * N * C;  // of one side
    const int64_t stride = (int64_t)layer_blocks(p.layers, p.num_layers, layer) * blockDim.x;
    for (int64_t t = (int64_t)(blockIdx.x - l.first_block) * blockDim.x + threadIdx.x;
         t < 2 * items; t += stride) {
        const int side = t < items ? 0 : 1;
        const int64_t item = t - side * items;
        const int64_t c = item % C, x = item / C % N, b = item / (C * N);
        // Element c of image b's row x; its row k*N + x at out[k*N*C].
        T* __restrict__ out = mut_ptr<T>(side == 0 ? l.rows_q : l.rows_k) +
                              (b * CCPL_NUM_NEIGHBORS * N + x) * C + c;
        difference_rows(ptr<T>(side == 0 ? l.feat_q : l.feat_k), l.shape, b, c, list[x],
                        [&](int k, float v) { out[k * N * C] = from_float<T>(v); });
    }
}

// One block draws (or reads) its layer's centres, then forms its share of the layer's
// difference rows: normalised in float with their norms (norms_q given), or raw in T. Drawing:
// every block of a layer draws the same centres from the same stream; the layer's first block
// draws them straight into `centers` (after taking the previous step's out of the map) and
// keeps the map in step, the others draw into shared memory (a layer with more than one block
// has at most CCPL_SMALL_S_MAX_ROWS / 8 centres). The last block to finish advances the step.
template <typename T> __device__ void small_s_gather(const ccpl_small_s_gather_params& p) {
    __shared__ int32_t drawn[CCPL_SMALL_S_MAX_ROWS / CCPL_NUM_NEIGHBORS];
    const int layer = layer_of_block(p.layers, p.num_layers, blockIdx.x);
    const ccpl_small_s_gather_layer& l = p.layers[layer];
    const int N = l.centers.count;
    int32_t* centers = mut_ptr<int32_t>(l.centers.flat);
    uint32_t* counters = mut_ptr<uint32_t>(p.counters);
    const bool writer = (int)blockIdx.x == l.first_block;
    const int32_t* list = centers;
    if (p.sample) {
        const uint64_t seed = load_u64(counters + CCPL_COUNTER_SEED);
        const uint64_t step = load_u64(counters + CCPL_COUNTER_STEP);
        int32_t* map = mut_ptr<int32_t>(l.centers.map);
        // Thread t clears and later sets the entries of the centres t, t + blockDim.x, ...;
        // the barriers of draw_centers order every clearing before every setting. An entry is
        // cleared only by its own centre: before the first step `centers` holds no centres
        // (zeros, the map all -1), and every thread writing one entry would race.
        if (writer) {
            for (int x = threadIdx.x; x < N; x += blockDim.x) {
                if (map[centers[x]] == x) map[centers[x]] = -1;
            }
        }
        int32_t* dst = writer ? centers : drawn;
        draw_centers(dst, N, l.shape.height, l.shape.width, CenterStream(seed, step, (uint32_t)layer));
        if (writer) {
            for (int x = threadIdx.x; x < N; x += blockDim.x) map[centers[x]] = x;
        }
        list = dst;
    }
    if (l.feat_q != 0 && l.norms_q != 0) {
        gather_normalized_rows<T>(p, layer, list);
    } else if (l.feat_q != 0) {
        gather_raw_rows<T>(p, layer, list);
    }
    if (p.sample && last_block(counters + CCPL_COUNTER_GATHER_DONE) && threadIdx.x == 0) {
        const uint64_t next = load_u64(counters + CCPL_COUNTER_STEP) + 1;
        counters[CCPL_COUNTER_STEP] = (uint32_t)next;
        counters[CCPL_COUNTER_STEP + 1] = (uint32_t)(next >> 32);
    }
}

// ---- 2. The rows loss and the gradient of the rows --------------------------------------

constexpr int kTileRows = SplitGemm::kRows;      // the rows a block owns
constexpr int kMaxRows = CCPL_SMALL_S_MAX_ROWS;  // S at most

// A row's normalised elements as the products read them: x * scale * factor with the row's
// ScaledNorm (row_norm.cuh), the power of two `scale` kept as its exponent, a byte: S floats
// more would not fit beside the logits in the static 48 KB, S bytes do.
struct UnitRow {
    float factor;
    int8_t exponent;
};

// The UnitRow of a row of norm `n`: x * 2^exponent * factor = x / (||row|| + eps).
__device__ __forceinline__ UnitRow unit_row(const ScaledNorm& n) {
    return UnitRow{n.unit_factor(), (int8_t)((int)(__float_as_uint(n.scale) >> 23) - 127)};
}

// Element x of a row, normalised: exact multiplication by the power of two, then one rounding.
__device__ __forceinline__ float unit_element(float x, int8_t exponent, float factor) {
    return x * __uint_as_float((uint32_t)(exponent + 127) << 23) * factor;
}

// The static shared memory of small_s_rows (48,084 bytes, as ptxas reports it, of the 49,152
// a block may have without opting in): the block's rows of logits against all S rows of the
// other side, then of G (32 KB at S = 512: what bounds S), what normalises the rows, and the
// operands of the products.
struct SmallShared {
    float logits[kTileRows][kMaxRows];
    float other_factor[kMaxRows];   // raw rows: UnitRow of other row j, as two arrays
    int8_t other_exponent[kMaxRows];
    ScaledNorm own_direction[kTileRows];  // u = x * scale / scaled, for the backward
    float own_norm[kTileRows];            // ||own row||, for the backward
    float own_factor[kTileRows];          // raw rows: UnitRow of own row m
    int8_t own_exponent[kTileRows];
    union {
        SplitGemmShared gemm;  // the operands of the products
        double sums[kWarp];    // the loss's block reduction
    };
};

// One block: layer `layer`, image b, own rows r0 .. r0 + 15. Forward (kTranspose false): own
// rows are rows_q, the other side rows_k; the block writes its rows' lse and loss, and the
// gradient of the loss (upstream 1) with respect to its rows of q. Transposed: own rows are
// rows_k, the other side rows_q; the gradient with respect to the block's rows of k, from the
// forward's lse and row loss. kNormalized: the rows are normalised already (the gather's), with
// their norms; else they are raw, and every product reads them normalised at their scale
// (unit_element), so that no product of rows overflows or underflows whatever their magnitude.
template <typename T, bool kTranspose, bool kNormalized>
__device__ void small_s_rows_block(const ccpl_small_s_rows_params& p, SmallShared& s) {
    const int layer = layer_of_block(p.layers, p.num_layers, blockIdx.x);
    const ccpl_small_s_rows_layer& l = p.layers[layer];
    const int64_t S = l.shape.rows, C = l.shape.width;
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

    // Norms: a warp per row, own rows first (the direction u and the norm, for the backward:
    // the norm the gather gives, or this row's), then, of raw rows, all S rows of the other
    // side. The forward of raw rows copies the rows of q and k it owns, for a later transposed
    // launch. A normalised row is read as it is: u = v / ||v|| at scale.
    const int64_t norm_rows = kTileRows + (kNormalized ? 0 : S);
    for (int64_t r = warp; r < norm_rows; r += warps) {
        const bool mine = r < kTileRows;
        const int64_t i = mine ? r0 + r : r - kTileRows;
        if (i >= S) continue;
        const T* row = (mine ? own : other) + i * C;
        const ScaledNorm n =
            scaled_norm(lane, C, [&](int64_t c, float scale) { return to_float(row[c]) * scale; });
        if (lane == 0 && mine) {
            s.own_direction[r] = n;
            s.own_norm[r] = kNormalized ? ptr<float>(kTranspose ? l.norms_k : l.norms_q)[b * S + i]
                                        : n.norm();
        }
        if (lane == 0 && !kNormalized) {
            const UnitRow unit = unit_row(n);
            (mine ? s.own_factor[r] : s.other_factor[i]) = unit.factor;
            (mine ? s.own_exponent[r] : s.other_exponent[i]) = unit.exponent;
        }
        float* copy = mine ? copy_q : (i >= r0 && i < r0 + kTileRows ? copy_k : nullptr);
        if (copy != nullptr) {
            for (int64_t c = lane; c < C; c += kWarp) copy[(b * S + i) * C + c] = to_float(row[c]);
        }
    }
    __syncthreads();
    // Own row m and other row j, element c, normalised.
    const auto own_unit = [&](int m, int64_t c) {
        const float x = to_float(own[(r0 + m) * C + c]);
        return kNormalized ? x : unit_element(x, s.own_exponent[m], s.own_factor[m]);
    };
    const auto other_unit = [&](int64_t j, int64_t c) {
        const float x = to_float(other[j * C + c]);
        return kNormalized ? x : unit_element(x, s.other_exponent[j], s.other_factor[j]);
    };

    // Products of the normalised rows, 64 columns of the other side at a time.
    for (int64_t j0 = 0; j0 < S; j0 += SplitGemm::kCols) {
        split_gemm_tile<true>(
            s.gemm, C, [&](int m, int64_t c) { return r0 + m < S && c < C ? own_unit(m, c) : 0.0f; },
            [&](int64_t c, int n) { return j0 + n < S && c < C ? other_unit(j0 + n, c) : 0.0f; },
            [&](int m, int n, float v) {
                if (j0 + n < S) s.logits[m][j0 + n] = v;
            });
    }

    // The cross-entropy of each own row (forward), and the block's rows of G = (P - I) / (B S
    // tau), where P - I is taken at (own i, other j) in the forward and at (other j, own i),
    // the softmax row of q_j, in the transposed launch. A warp per own row. The logit of rows
    // (i, j) is their product times 1/tau, rounded on its own: the transposed launch, whose
    // products are the forward's transposed (the same bits, split_gemm_tile), recomputes it exactly.
    const float inv_tau = p.inv_tau;
    const float coeff = inv_tau / (float)(l.shape.batch * S);
    for (int m = warp; m < kTileRows; m += warps) {
        const int64_t i = r0 + m;
        if (i >= S) {
            for (int64_t j = lane; j < S; j += kWarp) s.logits[m][j] = 0.0f;
            continue;
        }
        const auto logit = [&](int64_t j) { return __fmul_rn(s.logits[m][j], inv_tau); };
        if (kTranspose) {
            for (int64_t j = lane; j < S; j += kWarp) {
                s.logits[m][j] = softmax_minus_eye(j == i, logit(j), row_lse[j], row_loss[j]) * coeff;
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
        }
        for (int64_t j = lane; j < S; j += kWarp) {
            s.logits[m][j] = softmax_minus_eye(j == i, logit(j), lse, loss) * coeff;
        }
    }
    __syncthreads();

    // The gradient of the own normalised rows, G times the other side's normalised rows, 64
    // columns at a time, into grad.
    for (int64_t c0 = 0; c0 < C; c0 += SplitGemm::kCols) {
        split_gemm_tile<false>(
            s.gemm, S, [&](int m, int64_t j) { return j < S ? s.logits[m][j] : 0.0f; },
            [&](int64_t j, int n) { return j < S && c0 + n < C ? other_unit(j, c0 + n) : 0.0f; },
            [&](int m, int n, float v) {
                if (r0 + m < S && c0 + n < C) grad[(r0 + m) * C + c0 + n] = v;
            });
    }

    // Back through the normalisation, in place (the block's own writes, visible after the
    // barrier that ends split_gemm_tile), u = x * scale / scaled from the row's own ScaledNorm.
    for (int m = warp; m < kTileRows; m += warps) {
        const int64_t i = r0 + m;
        if (i >= S) continue;
        const T* row = own + i * C;
        float* g = grad + i * C;
        const ScaledNorm direction = s.own_direction[m];
        unit_row_backward(
            lane, C, s.own_norm[m],
            [&](int64_t c) {
                return direction.scaled > 0.0f ? to_float(row[c]) * direction.scale / direction.scaled
                                                : 0.0f;
            },
            [&](int64_t c) { return g[c]; }, [&](int64_t c, float v) { g[c] = v; });
    }
    if (kTranspose) return;

    // The loss, by the last block to finish: each layer's row losses (every block's, fenced by
    // last_block) summed in double, as info_nce_loss, so that neither a large sum overflows nor
    // a row loss's tiny share of the mean is rounded to a subnormal; then divided by B S, and
    // the layers' means added in a fixed order.
    if (!last_block(mut_ptr<uint32_t>(p.counters) + CCPL_COUNTER_ROWS_DONE)) return;
    double total = 0.0;
    for (int k = 0; k < p.num_layers; ++k) {
        const ccpl_small_s_rows_layer& lk = p.layers[k];
        const int64_t count = (int64_t)lk.shape.batch * lk.shape.rows;
        const volatile float* losses = ptr<float>(lk.row_loss);
        double sum = 0.0;
        for (int64_t e = threadIdx.x; e < count; e += blockDim.x) sum += losses[e];
        sum = block_sum(sum, s.sums);
        if (threadIdx.x == 0) {
            const double mean = sum / (double)count;
            mut_ptr<float>(p.layer_loss)[k] = (float)mean;
            total += mean;
        }
    }
    if (threadIdx.x == 0) mut_ptr<float>(p.loss)[0] = (float)total;
}

// The normalised rows are the gather's, float: the 16-bit kernels take raw rows only (the
// plans refuse normalised rows in T).
template <typename T> __device__ void small_s_rows(const ccpl_small_s_rows_params& p) {
    __shared__ SmallShared s;
    bool_switch(p.transpose, [&](auto transpose) {
        constexpr bool kTranspose = decltype(transpose)::value;
        if constexpr (std::is_same<T, float>::value) {
            bool_switch(p.normalized, [&](auto normalized) {
                small_s_rows_block<T, kTranspose, decltype(normalized)::value>(p, s);
            });
        } else {
            small_s_rows_block<T, kTranspose, false>(p, s);
        }
    });
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
    const float upstream = ptr<float>(p.upstream)[0];
    const int64_t C = l.shape.channels, N = l.centers.count;
    const int64_t total = (int64_t)l.shape.batch * N * C;
    const int64_t stride = (int64_t)layer_blocks(p.layers, p.num_layers, layer) * blockDim.x;
    for (int64_t t = (int64_t)(blockIdx.x - l.first_block) * blockDim.x + threadIdx.x; t < total;
         t += stride) {
        const int64_t c = t % C, b = t / (C * N);
        const int x = (int)((t / C) % N);
        const float* g = grad_rows + b * CCPL_NUM_NEIGHBORS * N * C + c;  // row r at g[r*C]
        scatter_window(
            l.shape, l.centers, x, [&](int64_t r) { return g[r * C]; },
            [&](int64_t q, float sum) {
                T* out = &grad_feat[feature_index(l.shape, b, c, q)];
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
