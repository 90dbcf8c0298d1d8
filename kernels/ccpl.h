/*
 * ccpl.h: the only ABI between the CUDA kernels and Rust.
 *
 * Plain C11 with <stdint.h> only: bindgen reads it for the Rust side (build.rs), NVRTC (or
 * nvcc) and the CPU emulator include it for the kernels. Every kernel takes exactly one of
 * the structs below by value. Device addresses are 64-bit integers (host addresses under the
 * emulator).
 *
 * Storage types: tensors that hold features or rows (feature maps, difference rows,
 * normalised rows and their gradients) are in the kernel's storage type T (float, __half or
 * __nv_bfloat16, named by the kernel suffix _f32, _f16, _bf16). Statistics (norms, logits,
 * logsumexp, per-row losses, the loss, the upstream gradient) are always float32.
 */
#ifndef CCPL_H
#define CCPL_H

#ifdef __CUDACC_RTC__
#include <cuda/std/cstdint> /* NVRTC has no C library headers */
#else
#include <stdint.h>
#endif

/* ---- Constants ---------------------------------------------------------------------- */

/* Epsilon added to a row's L2 norm before dividing (spec, normalisation). */
#define CCPL_NORM_EPS 1e-7

/* Number of neighbours of a centre: the 3x3 window without its centre. */
#define CCPL_NUM_NEIGHBORS 8

/*
 * The neighbour convention. Direction k (0..7) is the window slot held in nibble k of
 * CCPL_NEIGHBOR_SLOTS; slot j of the 3x3 window (raster order, 4 is the centre) lies at
 * (dh, dw) = (j / 3 - 1, j % 3 - 1). So k = 0..7 is (-1,-1) (-1,0) (-1,+1) (0,-1) (0,+1)
 * (+1,-1) (+1,0) (+1,+1), flat offsets -(W+1), -W, -(W-1), -1, +1, W-1, W, W+1.
 */
#define CCPL_NEIGHBOR_SLOTS 0x87653210u
#define CCPL_CENTER_SLOT 4

/* Layouts of a feature map. */
#define CCPL_LAYOUT_NCHW 0
#define CCPL_LAYOUT_NHWC 1

/* Threads per block of each kernel family (the launch plans in Rust read these). */
#define CCPL_NEIGHBOR_BLOCK 256
#define CCPL_NORMALIZE_BLOCK 256
#define CCPL_INFO_NCE_BLOCK 256

/*
 * The tiled kernels (similarity, info_nce_backward, info_nce_fused; tile_gemm.cuh and
 * tile_mma.cuh): one block of CCPL_TILE_THREADS threads per CCPL_TILE_SIDE-square output tile.
 */
#define CCPL_TILE_SIDE 64
#define CCPL_TILE_THREADS 256

/*
 * The small-S path (small_s.cu): the whole loss of every layer in three launches, for layers
 * whose S = 8N is at most CCPL_SMALL_S_MAX_ROWS (docs/small-s.md has the arithmetic). One
 * block of small_s_rows owns CCPL_SMALL_S_TILE_ROWS rows of one image and keeps their float
 * logits against all S rows of the other side in static shared memory (16 x 512 floats,
 * 32 KB). A launch takes at most CCPL_SMALL_S_MAX_LAYERS layers, each described by a
 * descriptor in the launch parameters (so a captured CUDA graph holds every address).
 */
#define CCPL_SMALL_S_MAX_ROWS 512
#define CCPL_SMALL_S_TILE_ROWS 16
#define CCPL_SMALL_S_MAX_LAYERS 8
#define CCPL_SMALL_S_BLOCK 256

/*
 * The counters of the small-S path: uint32 words in device memory. The sampler's key (seed)
 * and counter (step), 64 bits each, low word first; and, for the gather and the rows kernel,
 * the number of blocks that have finished (the last one does the launch's closing work:
 * advancing the step, summing the loss; then it resets the count to 0).
 */
#define CCPL_COUNTER_SEED 0
#define CCPL_COUNTER_STEP 2
#define CCPL_COUNTER_GATHER_DONE 4
#define CCPL_COUNTER_ROWS_DONE 5
#define CCPL_COUNTERS 6

/* ---- What the kernels of feature maps share ----------------------------------------- */

/* A feature map: (B, C, H, W) with CCPL_LAYOUT_NCHW, (B, H, W, C) with CCPL_LAYOUT_NHWC. */
typedef struct ccpl_feature_map {
    int32_t batch;
    int32_t channels;
    int32_t height;
    int32_t width;
    int32_t layout; /* CCPL_LAYOUT_* */
} ccpl_feature_map;

/* The row matrices of a tiled product: B images of S rows of width C each. */
typedef struct ccpl_row_shape {
    int32_t batch; /* B */
    int32_t rows;  /* S */
    int32_t width; /* C */
} ccpl_row_shape;

/*
 * The per-row statistics of an InfoNCE forward, float[B*S] each: row_lse = logsumexp_j L[b,i,j]
 * and row_loss = row_lse - L[b,i,i]. The forwards write them, the backwards read them.
 */
typedef struct ccpl_row_stats {
    uint64_t row_lse;
    uint64_t row_loss;
} ccpl_row_stats;

/*
 * The gradient an InfoNCE backward writes and what forms it besides the logits (or the rows
 * they are recomputed from), the same for both backwards: with G = (softmax(L) - I) * upstream
 * / (B*S), out = G other * inv_tau (transpose == 0, dq) or Gᵀ other * inv_tau (transpose == 1,
 * dk).
 */
typedef struct ccpl_info_nce_grad {
    ccpl_row_stats stats; /* in:  from the forward */
    uint64_t upstream;    /* in:  float[1], on the device */
    uint64_t out;         /* out: (B, S, C), T */
    ccpl_row_shape shape;
    int32_t transpose;
    float inv_tau;
} ccpl_info_nce_grad;

/* The N centres of a feature map, as its difference rows are taken at them. */
typedef struct ccpl_centers {
    uint64_t flat; /* int32[N], flat interior indices h*W + w */
    uint64_t map;  /* int32[H*W], index x of the centre at each position, or -1 */
    int32_t count; /* N */
} ccpl_centers;

/* ---- Launch parameters, one struct per kernel --------------------------------------- */

/* neighbor_diff_{T}: rows[b, k*N + x, :] = f[b, :, p_x] - f[b, :, p_x + off_k]. */
typedef struct ccpl_neighbor_diff_params {
    uint64_t feat; /* in:  layout of `shape`, T */
    uint64_t rows; /* out: (B, 8N, C), T */
    ccpl_centers centers; /* in: the flat indices (the map is not read) */
    ccpl_feature_map shape;
} ccpl_neighbor_diff_params;

/*
 * neighbor_diff_backward_{atomic,deterministic}_{T}: grad_feat += the scatter of grad_rows
 * (a centre gets +g, its neighbour -g). The deterministic variant has one writer per element
 * and a fixed summation order; it needs centers.map, the atomic one ignores it.
 */
typedef struct ccpl_neighbor_diff_backward_params {
    uint64_t grad_rows; /* in:  (B, 8N, C), T */
    uint64_t grad_feat; /* in/out: layout of `shape`, T, accumulated into */
    ccpl_centers centers; /* in */
    ccpl_feature_map shape;
} ccpl_neighbor_diff_backward_params;

/*
 * neighbor_diff_normalize_{T}: the difference rows of neighbor_diff_{T}, normalised as
 * normalize_rows_{T} does, without storing the difference rows: out[b, k*N + x, :] = d / (||d||
 * + eps) and norms = ||d|| with d = f[b, :, p_x] - f[b, :, p_x + off_k] formed in float. The
 * normalised rows are representable in T even where d is not (f16 differences past 65504).
 */
typedef struct ccpl_neighbor_diff_normalize_params {
    uint64_t feat;  /* in:  layout of `shape`, T */
    uint64_t out;   /* out: (B, 8N, C), T, normalised difference rows */
    uint64_t norms; /* out: float[B*8N] */
    ccpl_centers centers; /* in: the flat indices (the map is not read) */
    ccpl_feature_map shape;
} ccpl_neighbor_diff_normalize_params;

/*
 * normalize_rows_{T}: out = rows / (||row|| + eps), norms = ||row|| (row_norm.cuh: no overflow
 * of the sum of squares; a norm beyond float's range is stored as inf, the row still
 * normalised right).
 */
typedef struct ccpl_normalize_rows_params {
    uint64_t rows;  /* in:  (R, C), T */
    uint64_t out;   /* out: (R, C), T */
    uint64_t norms; /* out: float[R] */
    int32_t num_rows;
    int32_t width;
} ccpl_normalize_rows_params;

/*
 * normalize_rows_backward_{T}: grad_rows = g/(n+eps) - d (d.g) / (n (n+eps)^2), 0 term at
 * n == 0. From the rows before normalisation d, or (normalized == 1) from the forward's
 * normalised rows v = d/(n+eps), which are representable where d may not be.
 */
typedef struct ccpl_normalize_rows_backward_params {
    uint64_t rows;      /* in:  (R, C), T, d; or v with normalized == 1 */
    uint64_t norms;     /* in:  float[R], from the forward */
    uint64_t grad_out;  /* in:  (R, C), T */
    uint64_t grad_rows; /* out: (R, C), T */
    int32_t num_rows;
    int32_t width;
    int32_t normalized;
} ccpl_normalize_rows_backward_params;

/* similarity_{T}: logits[b, i, j] = q[b, i, :] . k[b, j, :] * inv_tau. */
typedef struct ccpl_similarity_params {
    uint64_t q;      /* in:  (B, S, C), T */
    uint64_t k;      /* in:  (B, S, C), T */
    uint64_t logits; /* out: (B, S, S), float */
    ccpl_row_shape shape;
    float inv_tau;
} ccpl_similarity_params;

/* info_nce_forward: per row, lse = logsumexp_j L[b,i,j] and row_loss = lse - L[b,i,i]. */
typedef struct ccpl_info_nce_forward_params {
    uint64_t logits;      /* in:  (B, S, S), float */
    ccpl_row_stats stats; /* out */
    int32_t batch;
    int32_t rows;
} ccpl_info_nce_forward_params;

/*
 * info_nce_loss: loss = mean(row_loss) in a fixed order (one block), summed in double so that
 * the sum cannot overflow where the mean fits; += when accumulate.
 */
typedef struct ccpl_info_nce_loss_params {
    uint64_t row_loss; /* in:  float[count] */
    uint64_t loss;     /* out: float[1] */
    int32_t count;
    int32_t accumulate;
} ccpl_info_nce_loss_params;

/*
 * info_nce_backward_{T}: with G = (softmax(L) - I) * upstream / (B*S),
 * transpose == 0: grad[b,i,:] = sum_j G[b,i,j] other[b,j,:] * inv_tau   (dq; other = k)
 * transpose == 1: grad[b,j,:] = sum_i G[b,i,j] other[b,i,:] * inv_tau   (dk; other = q)
 * The diagonal P_ii - 1 = expm1(-row_loss_i) comes from the row loss, not from
 * exp(L_ii - lse_i) - 1, which cancels in float when the diagonal dominates its row.
 */
typedef struct ccpl_info_nce_backward_params {
    uint64_t logits; /* in:  (B, S, S), float */
    uint64_t other;  /* in:  (B, S, C), T */
    ccpl_info_nce_grad grad;
} ccpl_info_nce_backward_params;

/*
 * info_nce_fused_forward_{T}: info_nce_forward of the logits L = q kᵀ * inv_tau without
 * storing them: per row, row_lse = logsumexp_j L[b,i,j] and row_loss = row_lse - L[b,i,i],
 * the logits computed tile by tile on the chip. One block per 64 rows of an image.
 */
typedef struct ccpl_info_nce_fused_forward_params {
    uint64_t q;           /* in:  (B, S, C), T, normalised rows */
    uint64_t k;           /* in:  (B, S, C), T, normalised rows */
    ccpl_row_stats stats; /* out */
    ccpl_row_shape shape;
    float inv_tau;
} ccpl_info_nce_fused_forward_params;

/*
 * info_nce_fused_backward_{T}: info_nce_backward with the logits recomputed from q and k
 * (the same bits as similarity_{T} stores: the scaling by inv_tau is rounded on its own,
 * never fused into the subtraction that follows) instead of read:
 * transpose == 0: grad[b,i,:] = sum_j G[b,i,j] k[b,j,:] * inv_tau   (dq)
 * transpose == 1: grad[b,j,:] = sum_i G[b,i,j] q[b,i,:] * inv_tau   (dk)
 */
typedef struct ccpl_info_nce_fused_backward_params {
    uint64_t q; /* in:  (B, S, C), T */
    uint64_t k; /* in:  (B, S, C), T */
    ccpl_info_nce_grad grad;
} ccpl_info_nce_fused_backward_params;

/*
 * small_s_gather_{T}: for every layer, the centres (drawn when `sample`, else read from
 * `centers`) and, for the layers that have rows here, the difference rows of both feature
 * maps: with norms_q given, normalised in float, with their norms (as neighbor_diff_normalize:
 * no difference row is stored, so none overflows); with norms_q == 0, raw in T (a learned
 * head's input: the values and layout of neighbor_diff's rows, formed in float, rounded once).
 * Drawing: N distinct interior positions, uniform, in random order, from Philox-4x32-10 keyed
 * by the seed with the counter (step, layer, word / 4); the layer's first block writes them to
 * `centers.flat` and keeps `centers.map` in step; the last block to finish advances the step
 * by one. A layer without feature maps (feat_q == 0) is only
 * drawn (its loss runs on the fused path).
 */
typedef struct ccpl_small_s_gather_layer {
    uint64_t feat_q;  /* in:  layout of `shape`, T; 0: draw the centres only */
    uint64_t feat_k;  /* in:  the same shape, T */
    uint64_t rows_q;  /* out: (B, 8N, C), feat_q's difference rows: normalised float, raw T */
    uint64_t rows_k;  /* out: (B, 8N, C), feat_k's */
    uint64_t norms_q; /* out: float[B*8N], their norms (inf past float's range); 0: raw rows */
    uint64_t norms_k; /* out: float[B*8N], or 0 with norms_q */
    ccpl_centers centers; /* out when sampling, in otherwise */
    ccpl_feature_map shape;
    int32_t first_block; /* the layer's blocks are first_block .. the next layer's first */
} ccpl_small_s_gather_layer;

typedef struct ccpl_small_s_gather_params {
    ccpl_small_s_gather_layer layers[CCPL_SMALL_S_MAX_LAYERS];
    uint64_t counters; /* uint32[CCPL_COUNTERS], device */
    int32_t num_layers;
    int32_t sample; /* 1: draw the centres and advance the step; 0: use `centers` */
} ccpl_small_s_gather_params;

/*
 * small_s_rows_{T}: for every layer, image and tile of CCPL_SMALL_S_TILE_ROWS rows, the rows
 * loss of rows_q against rows_k (normalisation, logits, cross-entropy) and the gradient of
 * the loss with respect to the rows, for an upstream gradient of 1, in float. The rows are
 * raw (normalised here, at scale), or with `normalized` the gather's normalised rows with
 * their norms (float rows only):
 * transpose == 0: grad_rows = d loss / d rows_q; row_lse, row_loss written; the per-layer
 *                 losses and their sum written by the last block (the row losses summed in
 *                 double, in one fixed order); copy_q, copy_k (when not 0) receive the rows
 *                 in float;
 * transpose == 1: grad_rows = d loss / d rows_k from the forward's row_lse and row_loss.
 */
typedef struct ccpl_small_s_rows_layer {
    uint64_t rows_q;    /* in:  (B, S, C), T */
    uint64_t rows_k;    /* in:  (B, S, C), T */
    uint64_t norms_q;   /* in:  float[B*S], the norms of normalised rows_q (`normalized`) */
    uint64_t norms_k;   /* in:  float[B*S] */
    uint64_t grad_rows; /* out: (B, S, C), float */
    uint64_t row_lse;   /* float[B*S]: out (transpose 0), in (transpose 1) */
    uint64_t row_loss;  /* float[B*S]: out (transpose 0), in (transpose 1) */
    uint64_t copy_q;    /* out: (B, S, C), float, or 0 */
    uint64_t copy_k;    /* out: (B, S, C), float, or 0 */
    ccpl_row_shape shape; /* S at most CCPL_SMALL_S_MAX_ROWS */
    int32_t first_block;  /* B * ceil(S / CCPL_SMALL_S_TILE_ROWS) blocks from here */
} ccpl_small_s_rows_layer;

typedef struct ccpl_small_s_rows_params {
    ccpl_small_s_rows_layer layers[CCPL_SMALL_S_MAX_LAYERS];
    uint64_t counters;   /* uint32[CCPL_COUNTERS], device */
    uint64_t layer_loss; /* out: float[num_layers] */
    uint64_t loss;       /* out: float[1], the sum of the layers' losses */
    int32_t num_layers;
    int32_t transpose;
    int32_t normalized; /* 1: rows_q, rows_k are normalised rows (float) with their norms */
    float inv_tau;
} ccpl_small_s_rows_params;

/*
 * small_s_scatter_{T}: grad_feat += upstream[0] * the scatter of grad_rows (a centre gets +g,
 * its neighbour -g), deterministic (one writer per element, a fixed order), every layer;
 * blockIdx.y is the side (0: q, 1: k; a layer with grad_feat_k == 0 has no k side).
 */
typedef struct ccpl_small_s_scatter_layer {
    uint64_t grad_rows_q; /* in:  (B, 8N, C), float */
    uint64_t grad_rows_k; /* in:  (B, 8N, C), float */
    uint64_t grad_feat_q; /* in/out: layout of `shape`, T, accumulated into */
    uint64_t grad_feat_k; /* in/out, or 0 */
    ccpl_centers centers; /* in */
    ccpl_feature_map shape;
    int32_t first_block;
} ccpl_small_s_scatter_layer;

typedef struct ccpl_small_s_scatter_params {
    ccpl_small_s_scatter_layer layers[CCPL_SMALL_S_MAX_LAYERS];
    uint64_t upstream; /* in: float[1], on the device */
    int32_t num_layers;
} ccpl_small_s_scatter_params;

/* small_s_scale_{T}: out = upstream[0] * grad_rows, rounded to T; blockIdx.y the side. */
typedef struct ccpl_small_s_scale_params {
    uint64_t grad_rows_q; /* in:  float[count] */
    uint64_t grad_rows_k; /* in:  float[count] */
    uint64_t out_q;       /* out: T[count] */
    uint64_t out_k;       /* out: T[count], or 0 */
    uint64_t upstream;    /* in:  float[1], on the device */
    int32_t count;
} ccpl_small_s_scale_params;

#endif /* CCPL_H */
