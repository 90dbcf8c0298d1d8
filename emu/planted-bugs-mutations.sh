# The planted bugs of emu/planted-bugs (which sources this file): MUTATIONS, four fields per
# bug.
# description; file under kernels/ (or emu/runtime/ when it starts with runtime/, or of the
# workspace when it starts with src/); exact text; replacement
MUTATIONS=(
    "block_sum: no barrier between writing the warps' sums and reading them"
    common.cuh
    $'    if (lane == 0) scratch[warp] = v;\n    __syncthreads();\n    v = lane < warps ? scratch[lane] : 0.0f;\n    return warp_sum(v);'
    $'    if (lane == 0) scratch[warp] = v;\n    v = lane < warps ? scratch[lane] : 0.0f;\n    return warp_sum(v);'

    "block_max (self-test): no barrier before reusing the scratch of the previous reduction"
    runtime/selftest.cu
    $'    v = ccpl::warp_max(v);\n    __syncthreads();\n    if (lane == 0)'
    $'    v = ccpl::warp_max(v);\n    if (lane == 0)'

    "warp_sum: the last shuffle step skipped (loop bound off by one)"
    common.cuh
    $'for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync'
    $'for (int o = kWarp / 2; o > 1; o /= 2) v += __shfl_xor_sync'

    "neighbor_diff: the last element not written (bound off by one)"
    neighbor.cu
    $'            rows[(b * CCPL_NUM_NEIGHBORS * N + k * N + x) * C + c] = from_float<T>(v);'
    $'            if (t + 1 < total) rows[(b * CCPL_NUM_NEIGHBORS * N + k * N + x) * C + c] = from_float<T>(v);'

    "neighbor_diff: the centre read is the next one (index off by one)"
    neighbor.cu
    $'difference_rows(feat, p.shape, b, c, centers[x], [&]'
    $'difference_rows(feat, p.shape, b, c, centers[(x + 1) % N], [&]'

    "difference_rows: last neighbour direction skipped"
    neighbor.cuh
    $'for (int k = 0; k < CCPL_NUM_NEIGHBORS; ++k) {\n        const int64_t nb'
    $'for (int k = 0; k < CCPL_NUM_NEIGHBORS - 1; ++k) {\n        const int64_t nb'

    "neighbor_diff_backward_atomic: the centre's sum misses the last direction"
    neighbor.cu
    $'            centre += v;'
    $'            if (k < CCPL_NUM_NEIGHBORS - 1) centre += v;'

    "scatter_window (deterministic scatter): the last window slot skipped"
    neighbor.cuh
    $'for (int q_slot = 0; q_slot < 9; ++q_slot)'
    $'for (int q_slot = 0; q_slot < 8; ++q_slot)'

    "normalize_rows: the last column not written (bound off by one)"
    normalize.cu
    $'for (int64_t c = lane; c < C; c += kWarp) out[c]'
    $'for (int64_t c = lane; c < C - 1; c += kWarp) out[c]'

    "unit_row_backward: the dot product not reduced over the warp"
    row_norm.cuh
    $'        along = warp_sum(along);'
    $''

    "scaled_norm: each lane scales the row by its own largest magnitude"
    row_norm.cuh
    $'norm_scale(warp_max(max_abs))'
    $'norm_scale(max_abs)'

    "normalized_difference_row: the last channel not stored (bound off by one)"
    neighbor.cuh
    $'for (int64_t c = lane; c < channels; c += kWarp) store(c, load(c, norm.scale) * factor);'
    $'for (int64_t c = lane; c < channels - 1; c += kWarp) store(c, load(c, norm.scale) * factor);'

    "normalized_difference_row: a difference past float's range not formed at the row's scale"
    neighbor.cuh
    $'return isinf(d) ? centre * scale - neighbour * scale : d * scale;'
    $'return d * scale;'

    "normalize_rows_backward: u taken as the normalised row itself, not v/||v||"
    normalize.cu
    $'kNormalized && norm > 0.0f ? scaled_norm(lane, C, load) : ScaledNorm{norm, 1.0f}'
    $'kNormalized && norm > 0.0f ? ScaledNorm{1.0f, 1.0f} : ScaledNorm{norm, 1.0f}'

    "tile_gemm: no barrier between filling the tiles and reading them"
    tile_gemm.cuh
    $'        gemm_fill<kBAlongK>(smem.b, [&](int n, int kk) { return load_b(k0 + kk, n); });\n        __syncthreads();'
    $'        gemm_fill<kBAlongK>(smem.b, [&](int n, int kk) { return load_b(k0 + kk, n); });'

    "tile_gemm: no barrier before the next stage overwrites the tiles"
    tile_gemm.cuh
    $'        }\n        __syncthreads();\n    }'
    $'        }\n    }'

    "info_nce_forward: the lane that keeps the row max is off by one"
    info_nce.cu
    $'lane == __ffs((int)at_max) - 1;'
    $'lane == __ffs((int)at_max);'

    "info_nce_loss: the last row loss left out of the mean (bound off by one)"
    info_nce.cu
    $'i < p.count; i += blockDim.x'
    $'i < p.count - 1; i += blockDim.x'

    "info_nce_backward: dq and dk read G the same way round"
    info_nce.cu
    $'return kTranspose ? g(k, r) : g(r, k);'
    $'return g(r, k);'

    "info_nce_fused_forward: the row statistics of a half-warp not merged over its last step"
    info_nce_fused.cu
    $'for (int o = Gemm::kSide / 2; o > 0; o /= 2)'
    $'for (int o = Gemm::kSide / 2; o > 1; o /= 2)'

    "info_nce_fused_backward: no barrier between forming G and reading it in GEMM 2"
    info_nce_fused.cu
    $'        __syncthreads();  // G, written by every thread, read by the fills of GEMM 2\n'
    $''

    "info_nce_fused_backward (tensor cores): no barrier between forming G and the products"
    info_nce_fused.cu
    $'        __syncthreads();  // G and the other side\'s tile, written by every thread\n'
    $''

    "mma_row_products: no barrier before the next stage overwrites the operands"
    tile_mma.cuh
    $'        __syncthreads();  // the next stage overwrites the operands\n'
    $''

    "tile_mma: both column blocks of a warp are its first"
    tile_mma.cuh
    $'* Mma::kBlocksPerWarp + f) * Mma::kFrag;'
    $'* Mma::kBlocksPerWarp) * Mma::kFrag;'

    "info_nce_fused_backward: the diagonal of G taken from the column's row loss"
    info_nce_fused.cu
    $'const int64_t row = kTranspose ? c : r;'
    $'const int64_t row = r;'

    "tile_mma: the float result tile (a WMMA store target) without its 32-byte alignment"
    tile_mma.cuh
    $'using MmaTile __align__(32) = float[kTileSide][Mma::kAccLd];\nstatic_assert(alignof(MmaTile) == 32, "WMMA operands are 32-byte aligned");'
    $'using MmaTile = float[kTileSide][Mma::kAccLd];'

    "tile_mma: the staged operands (WMMA load sources) without their 32-byte alignment"
    tile_mma.cuh
    $'    __align__(32) T a[kTileSide][Mma::kStageLd];\n    __align__(32) T b[kTileSide][Mma::kStageLd];'
    $'    T a[kTileSide][Mma::kStageLd];\n    T b[kTileSide][Mma::kStageLd];'

    "tile_mma: the logits product chained in one accumulator over C (truncation bias grows with C)"
    tile_mma.cuh
    $'                wmma::mma_sync(part[f], fa, fb, part[f]);\n            }\n        }\n        mma_add_stage(acc, part);'
    $'                wmma::mma_sync(acc[f], fa, fb, acc[f]);\n            }\n        }'

    "logits_tiles: the logit a plain product, which the compiler fuses into the next subtraction"
    logits_tiles.cuh
    $'{ return __fmul_rn(dot, inv_tau); }'
    $'{ return dot * inv_tau; }'

    "plan: dynamic shared memory over 48 KiB launched without the opt-in"
    src/launch/mod.rs
    $'self.shared_opt_in = static_bytes.saturating_add(bytes) > SHARED_WITHOUT_OPT_IN;'
    $'self.shared_opt_in = static_bytes > bytes && false;'

    "SmallRowsPlan: every layer's rows loss at the first layer's part of the workspace"
    src/loss/small_s/rows.rs
    $'at = at.after(shape)?;'
    $'at.after(shape)?;'

    "split_gemm_tile: no barrier between staging the operands and the products"
    split_gemm.cuh
    $'            s.stage.b[kk][n] = load_b(k0 + kk, n);\n        }\n        __syncthreads();'
    $'            s.stage.b[kk][n] = load_b(k0 + kk, n);\n        }'

    "split_gemm_tile: the last group's partial sums left out"
    split_gemm.cuh
    $'for (int g = 0; g < G::kSplits - 1; ++g)'
    $'for (int g = 0; g < G::kSplits - 2; ++g)'

    "small_s_rows: the diagonal logit taken from the next lane"
    small_s.cu
    $'__shfl_sync(kFullMask, diagonal, (int)(i % kWarp))'
    $'__shfl_sync(kFullMask, diagonal, (int)((i + 1) % kWarp))'

    "small_s_rows (transposed): G from the own row's statistics instead of the other side's"
    small_s.cu
    $'softmax_minus_eye(j == i, logit(j), row_lse[j], row_loss[j])'
    $'softmax_minus_eye(j == i, logit(j), row_lse[i], row_loss[i])'

    "small_s_scatter: the upstream gradient ignored"
    small_s.cu
    $'to_float(*out) + upstream * sum'
    $'to_float(*out) + sum'

    "draw_centers: a repeated draw kept instead of drawn again"
    philox.cuh
    $'if (__syncthreads_or(seen)) continue;'
    $'if (__syncthreads_or(false)) continue;'

    "below: Lemire's rejection of the low products left out (a biased draw, about 2^-12 a word)"
    philox.cuh
    $'while ((uint32_t)m < threshold) m = (uint64_t)word() * n;'
    $'(void)threshold;'

    "small_s_gather: the step counter's high word not carried at 2^32"
    small_s.cu
    $'        counters[CCPL_COUNTER_STEP + 1] = (uint32_t)(next >> 32);\n'
    $''

    # The sanitizer's (docs/sanitizer.md): bugs whose wrong values need not reach an output.
    # A mutation named after a check runs its tests with every check (CCPL_EMU_SANITIZE=all).
    "racecheck: neighbor_diff_backward_atomic: the scatter without its atomic"
    neighbor.cu
    $'    atomicAdd(addr, from_float<T>(v));'
    $'    *addr = from_float<T>(to_float(*addr) + v);'

    "racecheck: last_block: no barrier between the block's fences and its count"
    small_s.cu
    $'    __threadfence();\n    __syncthreads();\n'
    $'    __threadfence();\n'

    "initcheck: block_max (self-test): every lane reads the scratch, unwritten past the warps (a max hides it)"
    runtime/selftest.cu
    $'    v = lane < warps ? scratch[lane] : -INFINITY;'
    $'    v = scratch[lane];'

    "initcheck: normalize_rows: each norm maxed with the norms output before it is written (fmaxf drops the poison's NaN)"
    normalize.cu
    $'mut_ptr<float>(p.norms)[row] = norm.norm();'
    $'mut_ptr<float>(p.norms)[row] = fmaxf(ptr<float>(p.norms)[row], norm.norm());'

    "memcheck: row_norm: the scale's maximum reads one element past the row at zero weight (into the next, or past the buffer)"
    row_norm.cuh
    $'for (int64_t c = lane; c < C; c += kWarp) max_abs = fmaxf(max_abs, fabsf(load(c, 1.0f)));'
    $'for (int64_t c = lane; c <= C; c += kWarp) max_abs = fmaxf(max_abs, fabsf(load(c, 1.0f)) * (c < C));'

    "small_s_gather: the previous step's centres left in the map"
    small_s.cu
    $'if (map[centers[x]] == x) map[centers[x]] = -1;'
    $''

    "last_block: the count of finished blocks not reset for the next launch"
    small_s.cu
    $'        if (is_last) *(volatile uint32_t*)done = 0;\n'
    $''

    "small_s_gather: the k side's rows normalised from feat_q"
    small_s.cu
    $'ptr<T>(k_side ? l.feat_k : l.feat_q)'
    $'ptr<T>(l.feat_q)'

    "small_s_gather (raw rows): the k side's rows formed from feat_q"
    small_s.cu
    $'ptr<T>(side == 0 ? l.feat_q : l.feat_k)'
    $'ptr<T>(l.feat_q)'

    "small_s_gather: the last difference row not normalised (bound off by one)"
    small_s.cu
    $'r < 2 * rows; r += warps'
    $'r < 2 * rows - 1; r += warps'

    "small_s_gather: the norms of k's rows written over q's"
    small_s.cu
    $'mut_ptr<float>(k_side ? l.norms_k : l.norms_q)[row] = norm;'
    $'mut_ptr<float>(l.norms_q)[row] = norm;'

    "unit_row: the exponent of the row's scale off by one"
    small_s.cu
    $'(int)(__float_as_uint(n.scale) >> 23) - 127)'
    $'(int)(__float_as_uint(n.scale) >> 23) - 126)'

    "unit_element: the row's power of two left out"
    small_s.cu
    $'return x * __uint_as_float((uint32_t)(exponent + 127) << 23) * factor;'
    $'return x * factor;'

    "small_s_rows: the other side's raw rows read unnormalised"
    small_s.cu
    $'return kNormalized ? x : unit_element(x, s.other_exponent[j], s.other_factor[j]);'
    $'return x;'

    "small_s_rows (normalised rows): the own row's norm taken from the normalised row itself"
    small_s.cu
    $'s.own_norm[r] = kNormalized ? ptr<float>(kTranspose ? l.norms_k : l.norms_q)[b * S + i]\n                                        : n.norm();'
    $'s.own_norm[r] = n.norm();'

    "small_s_rows (transposed, normalised rows): the own rows' norms read from q's"
    small_s.cu
    $'ptr<float>(kTranspose ? l.norms_k : l.norms_q)[b * S + i]'
    $'ptr<float>(l.norms_q)[b * S + i]'

    "small_s_rows: the backward's direction u taken without the row's scale"
    small_s.cu
    $'to_float(row[c]) * direction.scale / direction.scaled'
    $'to_float(row[c]) / direction.scaled'

    "small_s_rows: each row loss divided by B S in float before the sum (a subnormal share)"
    small_s.cu
    $'sum += losses[e];\n        sum = block_sum(sum, s.sums);\n        if (threadIdx.x == 0) {\n            const double mean = sum / (double)count;'
    $'sum += losses[e] * (1.0f / (float)count);\n        sum = block_sum(sum, s.sums);\n        if (threadIdx.x == 0) {\n            const double mean = sum;'

    "small_s_rows: the last layer's loss left out of the total"
    small_s.cu
    $'for (int k = 0; k < p.num_layers; ++k) {\n        const ccpl_small_s_rows_layer& lk'
    $'for (int k = 0; k < p.num_layers - 1; ++k) {\n        const ccpl_small_s_rows_layer& lk'
)
