// selftest.cu: kernels that test the emulator itself (emu/tests/emulator.rs): thread
// coordinates, barriers and the block reduction of common.cuh, every shuffle, votes, atomics,
// static and dynamic shared memory (NaN in every block), races a missing barrier leaves, the
// portable WMMA, and the misuses the emulator must report. emu/build.rs compiles this file into
// the emulator library only; nvcc never sees it.
#include "common.cuh"
#include "selftest.h"

using Params = ccpl_emu_selftest_params;
using ccpl::kFullMask;
using ccpl::kWarp;
using ccpl::mut_ptr;
using ccpl::ptr;

namespace selftest {

__device__ __forceinline__ uint32_t global_thread() { return blockIdx.x * blockDim.x + threadIdx.x; }

// Static shared memory at namespace scope and inside an inline function.
__shared__ int namespace_flag;
__device__ __forceinline__ float* inline_scratch() {
    __shared__ float scratch[8];
    return scratch;
}

// This thread's part of the block's segment in[blockIdx.x * n, (blockIdx.x + 1) * n).
__device__ __forceinline__ float segment_sum(const Params& p) {
    const float* in = ptr<float>(p.in) + static_cast<int64_t>(blockIdx.x) * p.n;
    float s = 0.0f;
    for (int i = threadIdx.x; i < p.n; i += blockDim.x) s += in[i];
    return s;
}

// The maximum over the block, as block_sum of common.cuh (the kernels need no block maximum;
// this one gives the self-tests a second reduction sharing the same scratch).
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    const int warps = blockDim.x / kWarp;
    v = ccpl::warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : -INFINITY;
    return ccpl::warp_max(v);
}

}  // namespace selftest

// out[12 * global thread]: threadIdx, blockIdx, blockDim, gridDim.
CCPL_KERNEL(selftest_coordinates, Params) {
    const uint32_t block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
    const uint32_t thread = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
    uint32_t* o = mut_ptr<uint32_t>(p.out) + 12 * (block * blockDim.x * blockDim.y * blockDim.z + thread);
    const uint32_t v[12] = {threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y, blockIdx.z,
                            blockDim.x,  blockDim.y,  blockDim.z,  gridDim.x,  gridDim.y,  gridDim.z};
    for (int i = 0; i < 12; ++i) o[i] = v[i];
}

// Per block b of its segment (see segment_sum): out[3b] its sum, out[3b+1] the largest
// thread partial, out[3b+2] twice the sum; the scratch is reused by back-to-back reductions
// and the last thread writes, as every thread has the results.
CCPL_KERNEL(selftest_block_reduce, Params) {
    __shared__ float scratch[32];
    const float s = selftest::segment_sum(p);
    const float sum = ccpl::block_sum(s, scratch);
    const float max = selftest::block_max(s, scratch);
    const float twice = ccpl::block_sum(2.0f * s, scratch);
    if (threadIdx.x == blockDim.x - 1) {
        float* out = mut_ptr<float>(p.out) + 3 * blockIdx.x;
        out[0] = sum;
        out[1] = max;
        out[2] = twice;
    }
}

// block_sum without the barrier between writing the warps' sums and reading them: out[b] is
// right only when the schedule happens to run the writers first.
CCPL_KERNEL(selftest_racy_block_sum, Params) {
    __shared__ float scratch[32];
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
    float v = ccpl::warp_sum(selftest::segment_sum(p));
    if (lane == 0) scratch[warp] = v;
    v = lane < static_cast<int>(blockDim.x / kWarp) ? scratch[lane] : 0.0f;
    v = ccpl::warp_sum(v);
    if (threadIdx.x == 0) mut_ptr<float>(p.out)[blockIdx.x] = v;
}

// A warp's sum through shared memory, the pre-Volta way; only with __syncwarp between the
// steps (arg != 0) is it right, since warps need not run in lockstep.
CCPL_KERNEL(selftest_warp_lockstep, Params) {
    __shared__ float s[32];
    const int lane = threadIdx.x;
    s[lane] = ptr<float>(p.in)[lane];
    if (p.arg) __syncwarp();
    for (int o = 16; o > 0; o /= 2) {
        if (lane < o) s[lane] += s[lane + o];
        if (p.arg) __syncwarp();
    }
    if (lane == 0) mut_ptr<float>(p.out)[0] = s[0];
}

// out[8 * t + j]: what each shuffle returns for in[t] and offset or lane `arg`; j = 4..7
// with segments of width 8, 16, 4, 8.
CCPL_KERNEL(selftest_shuffles, Params) {
    const uint32_t t = selftest::global_thread();
    const int v = ptr<int>(p.in)[t];
    int* o = mut_ptr<int>(p.out) + 8 * t;
    o[0] = __shfl_sync(kFullMask, v, p.arg);
    o[1] = __shfl_up_sync(kFullMask, v, p.arg);
    o[2] = __shfl_down_sync(kFullMask, v, p.arg);
    o[3] = __shfl_xor_sync(kFullMask, v, p.arg);
    o[4] = __shfl_sync(kFullMask, v, p.arg, 8);
    o[5] = __shfl_up_sync(kFullMask, v, p.arg, 16);
    o[6] = __shfl_down_sync(kFullMask, v, p.arg, 4);
    o[7] = __shfl_xor_sync(kFullMask, v, p.arg, 8);
}

// 8-byte values through shuffles: out[2t] = the double, out[2t+1] = the 64-bit integer that
// __shfl_xor_sync(arg) brings from the other lane (in[t] scaled into both).
CCPL_KERNEL(selftest_shuffle_wide, Params) {
    const uint32_t t = selftest::global_thread();
    const int v = ptr<int>(p.in)[t];
    const double d = __shfl_xor_sync(kFullMask, v * 0.25 + 1e10, p.arg);
    const long long w = __shfl_xor_sync(kFullMask, static_cast<long long>(v) << 33 | 5, p.arg);
    memcpy(mut_ptr<uint64_t>(p.out) + 2 * t, &d, 8);
    mut_ptr<int64_t>(p.out)[2 * t + 1] = w;
}

// in[t]: the predicate. out[8 * t + j]: ballot, any, all, the ballot of the even lanes alone
// (-1 on odd lanes), __syncthreads_count, _and, _or, __popc(ballot).
CCPL_KERNEL(selftest_votes, Params) {
    const uint32_t t = selftest::global_thread();
    const int pred = ptr<int>(p.in)[t];
    int* o = mut_ptr<int>(p.out) + 8 * t;
    const unsigned ballot = __ballot_sync(kFullMask, pred);
    o[0] = static_cast<int>(ballot);
    o[1] = __any_sync(kFullMask, pred);
    o[2] = __all_sync(kFullMask, pred);
    o[3] = threadIdx.x % 2 == 0 ? static_cast<int>(__ballot_sync(0x55555555u, pred)) : -1;
    o[4] = __syncthreads_count(pred);
    o[5] = __syncthreads_and(pred);
    o[6] = __syncthreads_or(pred);
    o[7] = __popc(ballot);
}

// Every thread adds 1 to a counter of each type (slots 0-4: int, float, double, __half,
// __nv_bfloat16, each at the start of a 64-bit slot), then slot 5: atomicMax of the thread
// index, 6: atomicMin, 7: an increment by an atomicCAS loop.
CCPL_KERNEL(selftest_atomics, Params) {
    uint64_t* slots = mut_ptr<uint64_t>(p.out);
    const uint32_t t = selftest::global_thread();
    atomicAdd(reinterpret_cast<int*>(&slots[0]), 1);
    atomicAdd(reinterpret_cast<float*>(&slots[1]), 1.0f);
    atomicAdd(reinterpret_cast<double*>(&slots[2]), 1.0);
    atomicAdd(reinterpret_cast<__half*>(&slots[3]), __float2half_rn(1.0f));
    atomicAdd(reinterpret_cast<__nv_bfloat16*>(&slots[4]), __float2bfloat16_rn(1.0f));
    atomicMax(reinterpret_cast<int*>(&slots[5]), static_cast<int>(t));
    atomicMin(reinterpret_cast<unsigned*>(&slots[6]), t);
    unsigned* counter = reinterpret_cast<unsigned*>(&slots[7]);
    unsigned seen = atomicAdd(counter, 0u), assumed;  // read atomically: others write it
    do {
        assumed = seen;
        seen = atomicCAS(counter, assumed, assumed + 1);
    } while (seen != assumed);
}

// Shared memory, n = the launch's dynamic shared bytes. out[5 * global thread + j], 1 for
// yes: j=0 dynamic shared was NaN before this block wrote it; 1 a 2-D static array was; 2 a
// second declarator and a 16-byte aligned array were (and it is aligned); 3 the namespace
// scope and inline-function variables were (all bits set); 4 the value of the next thread,
// from dynamic shared after a barrier. Blocks write everything, so a later block seeing NaN
// shows the refill. arg != 0: thread 0 writes one byte past the dynamic shared memory.
CCPL_KERNEL(selftest_shared, Params) {
    CCPL_DYNAMIC_SHARED(float, dynamic);
    __shared__ float grid2d[4][33], single[7];
    __shared__ __align__(16) float aligned[8];
    const int t = threadIdx.x, n = blockDim.x;
    float* o = mut_ptr<float>(p.out) + 5 * selftest::global_thread();
    o[0] = isnan(dynamic[t]);
    o[1] = isnan(grid2d[t % 4][t % 33]);
    o[2] = isnan(single[t % 7]) && isnan(aligned[t % 8]) && reinterpret_cast<uintptr_t>(aligned) % 16 == 0;
    o[3] = selftest::namespace_flag == -1 && isnan(selftest::inline_scratch()[t % 8]);
    __syncthreads();
    dynamic[t] = ptr<float>(p.in)[blockIdx.x * n + t];
    grid2d[t % 4][t % 33] = single[t % 7] = aligned[t % 8] = selftest::inline_scratch()[t % 8] = 0.0f;
    selftest::namespace_flag = 0;
    if (t == 0) reinterpret_cast<unsigned char*>(dynamic)[p.n - 1 + (p.arg ? 1 : 0)] = 0;
    __syncthreads();
    o[4] = dynamic[(t + 1) % n];
}

// out[4t]: __float2half_rn(in[t]) bits, out[4t+1]: __float2bfloat16_rn bits, out[4t+2] and
// out[4t+3]: the float bits of converting those back.
CCPL_KERNEL(selftest_conversions, Params) {
    const uint32_t t = selftest::global_thread();
    if (t >= static_cast<uint32_t>(p.n)) return;
    const float x = ptr<float>(p.in)[t];
    const __half h = __float2half_rn(x);
    const __nv_bfloat16 b = __float2bfloat16_rn(x);
    uint32_t* o = mut_ptr<uint32_t>(p.out) + 4 * t;
    o[0] = __half_as_ushort(h);
    o[1] = __bfloat16_as_ushort(b);
    o[2] = __float_as_uint(__half2float(h));
    o[3] = __float_as_uint(__bfloat162float(b));
}

// The portable nvcuda::wmma: out = A B + C for 16x16 float matrices in in[0..256) (A),
// in[256..768) (B, C), all row-major; arg 0 multiplies in __half, 1 in __nv_bfloat16. B is
// loaded column-major from its transpose and D stored column-major, so both layouts of loads
// and stores are exercised. One warp.
template <typename T> __device__ void selftest_wmma_in(const Params& p) {
    namespace wmma = nvcuda::wmma;
    __shared__ __align__(32) T a[256];
    __shared__ __align__(32) T b_transposed[256];
    __shared__ __align__(32) float c[256];
    __shared__ __align__(32) float d[256];
    const float* in = ptr<float>(p.in);
    for (int i = threadIdx.x; i < 256; i += kWarp) {
        a[i] = T(in[i]);
        b_transposed[i % 16 * 16 + i / 16] = T(in[256 + i]);
        c[i] = in[512 + i];
    }
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::load_matrix_sync(fa, a, 16);
    wmma::load_matrix_sync(fb, b_transposed, 16);
    wmma::load_matrix_sync(acc, c, 16, wmma::mem_row_major);
    wmma::mma_sync(acc, fa, fb, acc);
    wmma::store_matrix_sync(d, acc, 16, wmma::mem_col_major);
    __syncthreads();
    for (int i = threadIdx.x; i < 256; i += kWarp) mut_ptr<float>(p.out)[i] = d[i % 16 * 16 + i / 16];
}
CCPL_KERNEL(selftest_wmma, Params) {
    if (p.arg) {
        selftest_wmma_in<__nv_bfloat16>(p);
    } else {
        selftest_wmma_in<__half>(p);
    }
}

// The misuses the emulator must report (arg selects one; out is written so nothing is dead):
// 0 __syncthreads at two call sites, 1 thread 0 returns before a barrier the others reach,
// 2 half a warp shuffles while the other half waits at a barrier (deadlock), 3 a mask without
// the calling lane, 4 a shuffle reading a lane outside its mask, 5 __trap(), 6 half a warp
// returns while the other half shuffles with the full mask, 7 half a warp returns while the
// other half calls a (warp-collective) wmma operation.
CCPL_KERNEL(selftest_misuse, Params) {
    const int lane = threadIdx.x % kWarp;
    int v = lane;
    switch (p.arg) {
        case 0:
            if (lane % 2) {
                __syncthreads();
            } else {
                __syncthreads();
            }
            break;
        case 1:
            if (threadIdx.x == 0) return;
            __syncthreads();
            break;
        case 2:
            if (lane < 16) {
                v = __shfl_xor_sync(kFullMask, v, 1);
            } else {
                __syncthreads();
            }
            break;
        case 3: v = __shfl_xor_sync(0xfffffffeu, v, 1); break;
        case 4:
            if (lane < 16) v = __shfl_down_sync(0x0000ffffu, v, 16);
            break;
        case 5:
            if (threadIdx.x == 3) __trap();
            break;
        case 6:
            if (lane >= 16) return;
            v = __shfl_xor_sync(kFullMask, v, 1);
            break;
        case 7:
            if (lane >= 16) return;
            {
                nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc;
                nvcuda::wmma::fill_fragment(acc, 1.0f);
                v = (int)acc.x[0];
            }
            break;
        default: break;
    }
    mut_ptr<int>(p.out)[selftest::global_thread()] = v;
}

// Global memory as the sanitizer sees it (arg selects; n inputs, a 1-D grid): 0 out[t] = in[t]
// for t < n; 1 thread 0 reads in[n], one past the input; 2 every thread adds in[t] to out[0],
// not atomically; 3 the same with atomicAdd; 4 the "last block" pattern: thread 0 of block b
// writes in[b] to out[1 + b], every thread fences, thread 0 counts the block at out[grid + 1]
// (as an unsigned), and the block that counts last sums out[1 ..= grid] into out[0]; 5 the
// same without the fence.
CCPL_KERNEL(selftest_sanitizer, Params) {
    __shared__ int is_last;
    const uint32_t t = selftest::global_thread();
    const float* in = ptr<float>(p.in);
    float* out = mut_ptr<float>(p.out);
    switch (p.arg) {
        case 0: if (t < static_cast<uint32_t>(p.n)) out[t] = in[t]; break;
        case 1: if (t == 0) out[0] = in[p.n]; break;
        case 2: if (t < static_cast<uint32_t>(p.n)) out[0] += in[t]; break;
        case 3: if (t < static_cast<uint32_t>(p.n)) atomicAdd(out, in[t]); break;
        default: {
            const uint32_t blocks = gridDim.x;
            if (threadIdx.x == 0) out[1 + blockIdx.x] = in[blockIdx.x];
            if (p.arg == 4) __threadfence();
            __syncthreads();
            if (threadIdx.x == 0) {
                is_last = atomicAdd(reinterpret_cast<unsigned*>(out + blocks + 1), 1u) == blocks - 1;
            }
            __syncthreads();
            if (is_last && threadIdx.x == 0) {
                float sum = 0.0f;
                for (uint32_t b = 0; b < blocks; ++b) sum += out[1 + b];
                out[0] = sum;
            }
        }
    }
}

// More static shared memory than a kernel may declare (ptxas refuses it; the emulator ends
// the launch at the declaration).
CCPL_KERNEL(selftest_large_static, Params) {
    __shared__ float big[13 * 1024];
    big[threadIdx.x] = 1.0f;
    mut_ptr<float>(p.out)[threadIdx.x] = big[threadIdx.x];
}

// Misaligned accesses the emulator must report (arg selects one; one warp): 0 a WMMA store 16
// bytes past a 32-byte aligned array, 1 a WMMA load with ldm = 4 halves (8 bytes), 2 a float
// read 2 bytes past a float, 3 a WMMA store into a float tile declared without __align__(32),
// which the emulator places 4 bytes past a multiple of 8 (as ptxas may). 4: the same tile
// declared __align__(32), no error.
CCPL_KERNEL(selftest_misaligned, Params) {
    namespace wmma = nvcuda::wmma;
    __shared__ __align__(32) float aligned_tile[16 * 17 + 8];
    __shared__ float plain_tile[16 * 16];
    __shared__ __align__(32) __half halves[16 * 16];
    for (int i = threadIdx.x; i < 256; i += kWarp) halves[i] = __float2half_rn(1.0f);
    __syncwarp();
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 1.0f);
    float v = 0.0f;
    switch (p.arg) {
        case 0: wmma::store_matrix_sync(aligned_tile + 4, acc, 16, wmma::mem_row_major); break;
        case 1: {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
            wmma::load_matrix_sync(a, halves, 4);
            break;
        }
        case 2: v = *reinterpret_cast<const float*>(reinterpret_cast<const char*>(aligned_tile) + 2); break;
        case 3: wmma::store_matrix_sync(plain_tile, acc, 16, wmma::mem_row_major); break;
        default: wmma::store_matrix_sync(aligned_tile, acc, 16, wmma::mem_row_major); break;
    }
    mut_ptr<float>(p.out)[threadIdx.x] = v;
}
