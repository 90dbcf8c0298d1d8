// cuda_emu.h: the CUDA built-ins the kernels use, for the host C++ compiler, so that the very
// same kernels/*.cu sources run on the CPU (the ccpl-emu crate, for tests).
//
// Each thread of a block is a fiber (emu/runtime/scheduler.cpp); a seeded scheduler switches
// between them in random order at every barrier, warp collective and atomic, so kernel logic
// that depends on luck (a missing __syncthreads(), a read of shared memory before it is
// written) gives a wrong or NaN result instead of passing. Shared memory starts as NaN bytes
// (0xFF) in every block. Misuse (a barrier not all threads reach, a warp mask that leaves out
// the calling lane) ends the launch with an error, never a hang.
//
// Static `__shared__` variables: emu/build.rs preprocesses every source, turns each
// `__shared__` declaration into a static variable and registers it with the runtime, which
// refills it with NaN at the start of every block (one copy per block: blocks run one after
// another). The marker below fails to compile anywhere emu/build.rs did not rewrite it.
//
// What the emulator cannot run (inline PTX: mma, cp.async, ldmatrix) goes behind
// `#ifdef CCPL_EMULATOR` with a portable fallback; those paths are checked on a GPU only.
// The WMMA API (nvcuda::wmma) is modelled below, so kernels using it run here as written.
#pragma once

#ifdef __CUDACC__
#error "emu/runtime/cuda_emu.h is the CPU emulator; nvcc uses the CUDA headers"
#endif

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cfloat>
#include <type_traits>

// Set while compiling for the emulator: the portable side of a GPU-only path.
#define CCPL_EMULATOR 1
// The compute capability the kernels see (common.cuh): the one the emulator models.
#define CCPL_ARCH (CCPL_EMU_ARCH * 10)

// ---- Qualifiers ------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __shared__ CCPL_EMU_SHARED_DECLARATION_NOT_REWRITTEN_BY_BUILD_RS

// ---- Vector types and the thread coordinates -------------------------------------------

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
    constexpr dim3() = default;
    constexpr dim3(unsigned int x_, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};


constexpr int warpSize = 32;

namespace ccpl_emu {

// The coordinates of the fiber that runs now; the scheduler sets them before it switches.
struct Coordinates {
    uint3 thread_idx, block_idx;
    dim3 block_dim, grid_dim;
};
extern Coordinates g_coords;

}  // namespace ccpl_emu

#define threadIdx (static_cast<const uint3&>(::ccpl_emu::g_coords.thread_idx))
#define blockIdx (static_cast<const uint3&>(::ccpl_emu::g_coords.block_idx))
#define blockDim (static_cast<const dim3&>(::ccpl_emu::g_coords.block_dim))
#define gridDim (static_cast<const dim3&>(::ccpl_emu::g_coords.grid_dim))

// ---- The runtime (emu/runtime/*.cpp) ----------------------------------------------------

namespace ccpl_emu {

// The warp collectives; each waits until every lane its mask names has arrived.
enum class WarpOp : int { Sync, ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All };

// Rendezvous of the calling lane's warp; returns the lane's result as raw bits.
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width,
                         const char* file, int line);

// Barrier of the block. `op` combines the predicates: 0 none, 1 count, 2 and, 3 or.
int sync_threads(int op, int predicate, const char* file, int line);

// A point where the scheduler may run another thread (atomics, fences).
void yield_point();

// Ends the launch with an error (never returns to the kernel).
[[noreturn]] void fail(const char* what, const char* file, int line);

// The launch's dynamic shared memory (NaN-filled in every block).
void* dynamic_shared();

// Registers a kernel by name, with the source that defines it; the thunk copies the parameter
// struct and calls the kernel.
struct KernelRegistration {
    KernelRegistration(const char* name, const char* file, size_t params_size, void (*thunk)(const void*),
                       bool instrumented);
};

// A static __shared__ declaration's storage (emu/build.rs turns `__shared__ D;` into a struct
// S { D; } held by one of these, and each declared name into a reference to its member).
// Registered so that every block sees it NaN-filled, and placed at an address that is a
// multiple of its alignment but of no larger power of two: where a GPU's ptxas may place it,
// so a WMMA operand that is not declared 32-byte aligned fails the alignment check here
// instead of working by luck.
struct SharedRegistration {
    SharedRegistration(void* address, size_t bytes);
    // Counts the variable's bytes towards the running launch's static shared memory (once per
    // launch) and checks the launch's limits.
    void use(const char* file, int line);
    size_t bytes;
    uint64_t launch = 0;  // the last launch that used it
};
template <typename S> struct SharedHolder {
    static constexpr size_t kAlign = alignof(S);
    alignas(2 * kAlign) unsigned char storage[sizeof(S) + kAlign];
    SharedRegistration registration{storage + kAlign, sizeof(S)};
    S& get() { return *reinterpret_cast<S*>(storage + kAlign); }
    S& use(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
        registration.use(file, line);
        return get();
    }
};

// The architecture the emulator models (CCPL_EMU_ARCH from emu/build.rs: 75, 80, 86, 89, 90,
// 100), for the kernels' CCPL_ARCH (common.cuh) and the tensor cores' arithmetic below.
#ifndef CCPL_EMU_ARCH
#error "emu/build.rs defines CCPL_EMU_ARCH, the modelled architecture"
#endif
constexpr int kArch = CCPL_EMU_ARCH;

// Formats a message into a per-thread buffer (for fail()).
const char* message(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Bit copies between a value of at most 8 bytes and the 64-bit slot the runtime exchanges.
template <typename T> inline uint64_t to_bits(const T& v) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                  "warp shuffles move values of at most 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof(T));
    return bits;
}
template <typename T> inline T from_bits(uint64_t bits) {
    T v;
    memcpy(&v, &bits, sizeof(T));
    return v;
}

template <WarpOp op, typename T>
inline T shuffle(const char* file, int line, unsigned mask, T var, int arg, int width = warpSize) {
    return from_bits<T>(warp_collective(op, mask, to_bits(var), arg, width, file, line));
}

// An atomic access of `bytes` at `address` from `code`, for the sanitizer (memcheck.cpp).
void atomic_access(void* address, size_t bytes, const void* code);

// A __threadfence(): a point where the scheduler may switch threads, and for the sanitizer a
// fence of the calling thread (shadow.cpp).
void thread_fence();

// Read-modify-write of one word; the yield before it lets other threads interleave. Its own
// load and store are not instrumented: the sanitizer sees them as one atomic access.
template <typename T, typename F>
__attribute__((no_sanitize("thread"), noinline)) T atomic_update(T* address, F update) {
    yield_point();
    atomic_access(address, sizeof(T), __builtin_return_address(0));
    const T old = *address;
    *address = update(old);
    return old;
}

}  // namespace ccpl_emu

// ---- Launch glue used by common.cuh ----------------------------------------------------

// Whether this unit calls the sanitizer's hooks (GCC's -fsanitize=thread, emu/build.rs): a
// launch that asks for checks of a kernel built without them is refused, not passed unchecked.
#ifdef __SANITIZE_THREAD__
#define CCPL_EMU_INSTRUMENTED true
#else
#define CCPL_EMU_INSTRUMENTED false
#endif

// Declares the kernel and registers it under its name (the emulator's launch looks it up).
#define CCPL_KERNEL(name, Params)                                                              \
    static void name(const Params p);                                                          \
    static const ::ccpl_emu::KernelRegistration ccpl_emu_registration_##name(                  \
        #name, __FILE__, sizeof(Params), [](const void* raw) {                                 \
            Params p;                                                                          \
            memcpy(&p, raw, sizeof(Params));                                                   \
            name(p);                                                                           \
        }, CCPL_EMU_INSTRUMENTED);                                                             \
    static void name(const Params p)

// The launch's dynamic shared memory, viewed as an array of `type` (inside a function).
#define CCPL_DYNAMIC_SHARED(type, name) type* const name = static_cast<type*>(::ccpl_emu::dynamic_shared())

// ---- Synchronisation --------------------------------------------------------------------

#define __syncthreads() ((void)::ccpl_emu::sync_threads(0, 0, __FILE__, __LINE__))
#define __syncthreads_count(pred) ::ccpl_emu::sync_threads(1, (pred), __FILE__, __LINE__)
#define __syncthreads_and(pred) ::ccpl_emu::sync_threads(2, (pred), __FILE__, __LINE__)
#define __syncthreads_or(pred) ::ccpl_emu::sync_threads(3, (pred), __FILE__, __LINE__)

#define CCPL_EMU_WARP_VOTE(op, mask, pred) \
    ::ccpl_emu::warp_collective(::ccpl_emu::WarpOp::op, (mask), (pred) ? 1u : 0u, 0, warpSize, __FILE__, __LINE__)
#define __syncwarp(...) ::ccpl_emu::SyncWarp{__FILE__, __LINE__}(__VA_ARGS__)
#define __ballot_sync(mask, pred) static_cast<unsigned>(CCPL_EMU_WARP_VOTE(Ballot, mask, pred))
#define __any_sync(mask, pred) static_cast<int>(CCPL_EMU_WARP_VOTE(Any, mask, pred))
#define __all_sync(mask, pred) static_cast<int>(CCPL_EMU_WARP_VOTE(All, mask, pred))

#define __shfl_sync(...) ::ccpl_emu::shuffle<::ccpl_emu::WarpOp::ShflIdx>(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::ccpl_emu::shuffle<::ccpl_emu::WarpOp::ShflUp>(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::ccpl_emu::shuffle<::ccpl_emu::WarpOp::ShflDown>(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::ccpl_emu::shuffle<::ccpl_emu::WarpOp::ShflXor>(__FILE__, __LINE__, __VA_ARGS__)

namespace ccpl_emu {
// __syncwarp(mask = all lanes), remembering where it is called.
struct SyncWarp {
    const char* file;
    int line;
    void operator()(unsigned mask = 0xffffffffu) const {
        warp_collective(WarpOp::Sync, mask, 0, 0, warpSize, file, line);
    }
};
}  // namespace ccpl_emu

#define __trap() ::ccpl_emu::fail("__trap() was called", __FILE__, __LINE__)

// A memory fence: host memory is coherent, and blocks run one after another, so what is
// left of it is a point where the scheduler may switch threads, and the sanitizer's model of
// the order between blocks (shadow.cpp).
#define __threadfence() ::ccpl_emu::thread_fence()

// ---- Half-precision storage types --------------------------------------------------------

namespace ccpl_emu {

// float -> binary16, round to nearest even; NaN becomes 0x7fff as in CUDA's conversion.
inline uint16_t float_to_half_bits(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return 0x7fffu;
    if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: inf
    if (ax >= 0x38800000u) {                                              // normal half
        uint32_t h = ((ax >> 23) - 112u) << 10 | ((ax & 0x7fffffu) >> 13);
        const uint32_t rest = ax & 0x1fffu;
        if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
        return static_cast<uint16_t>(sign | h);
    }
    if (ax < 0x33000000u) return static_cast<uint16_t>(sign);  // below half the smallest subnormal
    const uint32_t shift = 126u - (ax >> 23), mantissa = (ax & 0x7fffffu) | 0x800000u;
    uint32_t h = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
    if (rest > halfway || (rest == halfway && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
}

// binary16 -> float, exact.
inline float half_bits_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
    uint32_t x;
    if (exponent == 0x1fu) {
        x = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent != 0) {
        x = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else {
        const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;  // subnormal or zero
        memcpy(&x, &magnitude, 4);
        x |= sign;
    }
    float f;
    memcpy(&f, &x, 4);
    return f;
}

// float -> bfloat16, round to nearest even; NaN becomes 0x7fff as in CUDA's conversion.
inline uint16_t float_to_bfloat16_bits(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float bfloat16_bits_to_float(uint16_t b) {
    const uint32_t x = static_cast<uint32_t>(b) << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}

}  // namespace ccpl_emu

struct __half {
    uint16_t __x;
    __half() = default;
    __half(float f) : __x(::ccpl_emu::float_to_half_bits(f)) {}
    operator float() const { return ::ccpl_emu::half_bits_to_float(__x); }
};
struct __nv_bfloat16 {
    uint16_t __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : __x(::ccpl_emu::float_to_bfloat16_bits(f)) {}
    operator float() const { return ::ccpl_emu::bfloat16_bits_to_float(__x); }
};

inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return static_cast<float>(b); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }

// ---- Warp matrix multiply-accumulate (nvcuda::wmma) --------------------------------------
//
// A portable model of the WMMA API: every lane holds the whole tile (row-major in x[]), so
// the kernels must not rely on which elements a lane holds (they may use x[]/num_elements
// only element-wise and layout-agnostically). Each operation is warp-collective as on the
// GPU: all 32 lanes must call it (a __syncwarp() at its entry checks that). Loads and stores
// check the CUDA C++ alignment rules; mma_sync adds as the modelled architecture's tensor
// cores do (hmma.h), not as fmaf would.

namespace ccpl_emu {

// The CUDA C++ Programming Guide's rule for load_matrix_sync and store_matrix_sync: "mptr
// must be a 256-bit aligned pointer" and ldm a multiple of 16 bytes (8 __half, 4 float).
// (The PTX ISA's wmma.load asks more, every row 32-byte aligned: the common padding by 8
// halves breaks it, and the C++ API it implements is documented with the rule checked here.)
inline void check_wmma_operand(const char* op, const void* p, unsigned ldm, size_t element, const char* file,
                               int line) {
    if (reinterpret_cast<uintptr_t>(p) % 32 != 0) {
        fail(message("%s: the pointer %p is not 32-byte (256-bit) aligned, as WMMA requires (declare the "
                     "operand __align__(32))",
                     op, p),
             file, line);
    }
    if (ldm * element % 16 != 0) {
        fail(message("%s: ldm = %u elements of %zu bytes is not a multiple of 16 bytes, as WMMA requires", op, ldm,
                     element),
             file, line);
    }
}

// The result of one warp's last mma_sync, by content: every lane of the warp holds the same
// tile and calls mma_sync with it, so one lane computes and the others copy.
struct MmaMemo {
    bool valid = false;
    size_t tag = 0;
    unsigned char inputs[3 * 16 * 16 * sizeof(float)];
    float out[16 * 16];
};
MmaMemo& mma_memo();  // the calling lane's warp's

}  // namespace ccpl_emu

#include "hmma.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K> struct fragment_shape;
template <int M, int N, int K> struct fragment_shape<matrix_a, M, N, K> {
    static constexpr int rows = M, cols = K;
};
template <int M, int N, int K> struct fragment_shape<matrix_b, M, N, K> {
    static constexpr int rows = K, cols = N;
};
template <int M, int N, int K> struct fragment_shape<accumulator, M, N, K> {
    static constexpr int rows = M, cols = N;
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static constexpr int rows = fragment_shape<Use, M, N, K>::rows;
    static constexpr int cols = fragment_shape<Use, M, N, K>::cols;
    static constexpr int num_elements = rows * cols;
    T x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float v) {
    __syncwarp();
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = T(v);
}

// Element (r, c) of a tile at p with leading dimension ldm, row- or column-major.
inline size_t element_offset(int r, int c, unsigned ldm, bool row_major_layout) {
    return row_major_layout ? (size_t)r * ldm + c : (size_t)c * ldm + r;
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    static_assert(!std::is_same<Use, accumulator>::value, "an accumulator load needs a layout");
    __syncwarp();
    ::ccpl_emu::check_wmma_operand("wmma::load_matrix_sync", p, ldm, sizeof(T), file, line);
    constexpr bool row = std::is_same<Layout, row_major>::value;
    for (int r = 0; r < f.rows; ++r)
        for (int c = 0; c < f.cols; ++c) f.x[r * f.cols + c] = p[element_offset(r, c, ldm, row)];
}

template <int M, int N, int K, typename T>
inline void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, const T* p, unsigned ldm, layout_t layout,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    __syncwarp();
    ::ccpl_emu::check_wmma_operand("wmma::load_matrix_sync", p, ldm, sizeof(T), file, line);
    for (int r = 0; r < f.rows; ++r)
        for (int c = 0; c < f.cols; ++c)
            f.x[r * f.cols + c] = p[element_offset(r, c, ldm, layout == mem_row_major)];
}

template <int M, int N, int K, typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout,
                              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    __syncwarp();
    ::ccpl_emu::check_wmma_operand("wmma::store_matrix_sync", p, ldm, sizeof(T), file, line);
    // Every lane holds the whole tile; each stores every 32nd element of it, as the lanes of a
    // GPU store their own parts, so that the sanitizer sees one writer per element.
    const dim3 b = blockDim;
    const int lane = static_cast<int>((threadIdx.x + b.x * (threadIdx.y + b.y * threadIdx.z)) % warpSize);
    for (int i = lane; i < f.rows * f.cols; i += warpSize)
        p[element_offset(i / f.cols, i % f.cols, ldm, layout == mem_row_major)] = f.x[i];
}

// What an mma_sync's memo entry is for: its shape and input type.
template <int M, int N, int K, typename T> constexpr size_t memo_tag() {
    return (size_t)M << 24 | (size_t)N << 16 | (size_t)K << 8 | (std::is_same<T, __nv_bfloat16>::value ? 2 : 1);
}

// d = a b + c (d may be c), element by element as the modelled tensor cores add
// (ccpl_emu::hmma_dot).
template <int M, int N, int K, typename T, typename LayoutA, typename LayoutB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d,
                     const fragment<matrix_a, M, N, K, T, LayoutA>& a,
                     const fragment<matrix_b, M, N, K, T, LayoutB>& b,
                     const fragment<accumulator, M, N, K, float>& c) {
    static_assert(M * N <= 256 && M * K <= 256 && K * N <= 256, "the memo holds 16x16 tiles");
    __syncwarp();
    ::ccpl_emu::MmaMemo& memo = ::ccpl_emu::mma_memo();
    unsigned char inputs[sizeof memo.inputs];
    memcpy(inputs, a.x, sizeof a.x);
    memcpy(inputs + sizeof a.x, b.x, sizeof b.x);
    memcpy(inputs + sizeof a.x + sizeof b.x, c.x, sizeof c.x);
    const size_t tag = memo_tag<M, N, K, T>();
    const size_t used = sizeof a.x + sizeof b.x + sizeof c.x;
    if (!(memo.valid && memo.tag == tag && memcmp(memo.inputs, inputs, used) == 0)) {
        constexpr ::ccpl_emu::HmmaModel model = ::ccpl_emu::hmma_model(::ccpl_emu::kArch);
        constexpr int emin = ::ccpl_emu::input_emin<T>();
        for (int m = 0; m < M; ++m) {
            for (int n = 0; n < N; ++n) {
                double row[K], column[K];
                for (int k = 0; k < K; ++k) {
                    row[k] = float(a.x[m * K + k]);
                    column[k] = float(b.x[k * N + n]);
                }
                memo.out[m * N + n] = ::ccpl_emu::hmma_dot(model, emin, c.x[m * N + n], row, column, K);
            }
        }
        memcpy(memo.inputs, inputs, used);
        memo.tag = tag;
        memo.valid = true;
    }
    for (int i = 0; i < M * N; ++i) d.x[i] = memo.out[i];
}

}  // namespace wmma
}  // namespace nvcuda

// ---- Atomics ---------------------------------------------------------------------------

#define CCPL_EMU_ATOMIC(name, T, expr)                                                  \
    inline T name(T* address, T val) {                                                  \
        return ::ccpl_emu::atomic_update(address, [&](T old) -> T { (void)old; return expr; }); \
    }
CCPL_EMU_ATOMIC(atomicAdd, int, old + val)
CCPL_EMU_ATOMIC(atomicAdd, unsigned int, old + val)
CCPL_EMU_ATOMIC(atomicAdd, unsigned long long, old + val)
CCPL_EMU_ATOMIC(atomicAdd, float, old + val)
CCPL_EMU_ATOMIC(atomicAdd, double, old + val)
CCPL_EMU_ATOMIC(atomicAdd, __half, __half(float(old) + float(val)))
CCPL_EMU_ATOMIC(atomicAdd, __nv_bfloat16, __nv_bfloat16(float(old) + float(val)))
CCPL_EMU_ATOMIC(atomicMax, int, old > val ? old : val)
CCPL_EMU_ATOMIC(atomicMax, unsigned int, old > val ? old : val)
CCPL_EMU_ATOMIC(atomicMax, long long, old > val ? old : val)
CCPL_EMU_ATOMIC(atomicMax, unsigned long long, old > val ? old : val)
CCPL_EMU_ATOMIC(atomicMin, int, old < val ? old : val)
CCPL_EMU_ATOMIC(atomicMin, unsigned int, old < val ? old : val)
CCPL_EMU_ATOMIC(atomicMin, long long, old < val ? old : val)
CCPL_EMU_ATOMIC(atomicMin, unsigned long long, old < val ? old : val)
#undef CCPL_EMU_ATOMIC

template <typename T> inline T ccpl_emu_atomic_cas(T* address, T compare, T val) {
    return ::ccpl_emu::atomic_update(address, [&](T old) { return old == compare ? val : old; });
}
inline int atomicCAS(int* a, int c, int v) { return ccpl_emu_atomic_cas(a, c, v); }
inline unsigned int atomicCAS(unsigned int* a, unsigned int c, unsigned int v) { return ccpl_emu_atomic_cas(a, c, v); }
inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long c, unsigned long long v) {
    return ccpl_emu_atomic_cas(a, c, v);
}
inline unsigned short atomicCAS(unsigned short* a, unsigned short c, unsigned short v) {
    return ccpl_emu_atomic_cas(a, c, v);
}

// ---- Math and bit intrinsics -----------------------------------------------------------

// Multiply and add rounded on their own, never fused into an FMA (CUDA: "will never be merged
// into a single multiply-add instruction"): the empty asm makes the host compiler, which
// contracts a*b+c here as nvcc does (emu/build.rs), take the rounded value as it is.
namespace ccpl_emu {
inline float unfused(float x) {
#if defined(__x86_64__)
    asm("" : "+x"(x));
#else
    asm("" : "+m"(x));
#endif
    return x;
}
}  // namespace ccpl_emu
inline float __fmul_rn(float a, float b) { return ::ccpl_emu::unfused(a * b); }
inline float __fadd_rn(float a, float b) { return ::ccpl_emu::unfused(a + b); }

inline unsigned int __float_as_uint(float f) { return static_cast<unsigned int>(::ccpl_emu::to_bits(f)); }
inline float __uint_as_float(unsigned int u) { return ::ccpl_emu::from_bits<float>(u); }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }


