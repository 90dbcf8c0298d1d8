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

/* ---- Launch parameters, one struct per kernel --------------------------------------- */

/* neighbor_diff_{T}: rows[b, k*N + x, :] = f[b, :, p_x] - f[b, :, p_x + off_k]. */
typedef struct ccpl_neighbor_diff_params {
    uint64_t feat;    /* in:  (B,C,H,W) or (B,H,W,C), T */
    uint64_t centers; /* in:  int32[N], flat interior indices h*W + w */
    uint64_t rows;    /* out: (B, 8N, C), T */
    int32_t batch;
    int32_t channels;
    int32_t height;
    int32_t width;
    int32_t num_centers;
    int32_t layout; /* CCPL_LAYOUT_* */
} ccpl_neighbor_diff_params;

/*
 * neighbor_diff_backward_{atomic,deterministic}_{T}: grad_feat += the scatter of grad_rows
 * (a centre gets +g, its neighbour -g). The deterministic variant has one writer per element
 * and a fixed summation order; it needs center_map, the atomic one ignores it.
 */
typedef struct ccpl_neighbor_diff_backward_params {
    uint64_t grad_rows;  /* in:  (B, 8N, C), T */
    uint64_t centers;    /* in:  int32[N] */
    uint64_t center_map; /* in:  int32[H*W], index x of the centre at each position, or -1 */
    uint64_t grad_feat;  /* in/out: layout of the feature map, T, accumulated into */
    int32_t batch;
    int32_t channels;
    int32_t height;
    int32_t width;
    int32_t num_centers;
    int32_t layout;
} ccpl_neighbor_diff_backward_params;

/*
 * neighbor_diff_normalize_{T}: the difference rows of neighbor_diff_{T}, normalised as
 * normalize_rows_{T} does, without storing the difference rows: out[b, k*N + x, :] = d / (||d||
 * + eps) and norms = ||d|| with d = f[b, :, p_x] - f[b, :, p_x + off_k] formed in float. The
 * normalised rows are representable in T even where d is not (f16 differences past 65504).
 */
typedef struct ccpl_neighbor_diff_normalize_params {
    uint64_t feat;    /* in:  (B,C,H,W) or (B,H,W,C), T */
    uint64_t centers; /* in:  int32[N] */
    uint64_t out;     /* out: (B, 8N, C), T, normalised difference rows */
    uint64_t norms;   /* out: float[B*8N] */
    int32_t batch;
    int32_t channels;
    int32_t height;
    int32_t width;
    int32_t num_centers;
    int32_t layout;
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
    int32_t batch;
    int32_t rows; /* S */
    int32_t width; /* C */
    float inv_tau;
} ccpl_similarity_params;

/* info_nce_forward: per row, lse = logsumexp_j L[b,i,j] and row_loss = lse - L[b,i,i]. */
typedef struct ccpl_info_nce_forward_params {
    uint64_t logits;   /* in:  (B, S, S), float */
    uint64_t row_lse;  /* out: float[B*S] */
    uint64_t row_loss; /* out: float[B*S] */
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
    uint64_t logits;   /* in:  (B, S, S), float */
    uint64_t row_lse;  /* in:  float[B*S], from the forward */
    uint64_t row_loss; /* in:  float[B*S], from the forward */
    uint64_t other;    /* in:  (B, S, C), T */
    uint64_t upstream; /* in:  float[1], on the device */
    uint64_t grad;     /* out: (B, S, C), T */
    int32_t batch;
    int32_t rows;
    int32_t width;
    int32_t transpose;
    float inv_tau;
} ccpl_info_nce_backward_params;

/*
 * info_nce_fused_forward_{T}: info_nce_forward of the logits L = q kᵀ * inv_tau without
 * storing them: per row, row_lse = logsumexp_j L[b,i,j] and row_loss = row_lse - L[b,i,i],
 * the logits computed tile by tile on the chip. One block per 64 rows of an image.
 */
typedef struct ccpl_info_nce_fused_forward_params {
    uint64_t q;        /* in:  (B, S, C), T, normalised rows */
    uint64_t k;        /* in:  (B, S, C), T, normalised rows */
    uint64_t row_lse;  /* out: float[B*S] */
    uint64_t row_loss; /* out: float[B*S] */
    int32_t batch;
    int32_t rows;  /* S */
    int32_t width; /* C */
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
    uint64_t q;        /* in:  (B, S, C), T */
    uint64_t k;        /* in:  (B, S, C), T */
    uint64_t row_lse;  /* in:  float[B*S], from the forward */
    uint64_t row_loss; /* in:  float[B*S], from the forward */
    uint64_t upstream; /* in:  float[1], on the device */
    uint64_t grad;     /* out: (B, S, C), T */
    int32_t batch;
    int32_t rows;
    int32_t width;
    int32_t transpose;
    float inv_tau;
} ccpl_info_nce_fused_backward_params;

#endif /* CCPL_H */
