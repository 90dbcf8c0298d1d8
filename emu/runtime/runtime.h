// runtime.h: what the files of the CPU emulator's runtime share (not for the kernels: they see
// cuda_emu.h). The runtime runs a launch's blocks one after another on the calling OS thread;
// the threads of a block are fibers, each on its own stack (context.cpp), switched at every
// barrier, warp collective, atomic and fence by a scheduler seeded by the launch
// (scheduler.cpp). Barriers and warp collectives have CUDA's semantics per thread: every thread
// of the block (every lane named in the mask) must arrive, and anything else is reported as an
// error instead of hanging (builtins.cpp, what the kernels call). launch.cpp is the C ABI that
// emu/src/library.rs calls; misaligned.cpp reports misaligned accesses; memcheck.cpp and
// shadow.cpp are the sanitizer (every memory access of a kernel, its bounds, initialisation and
// races).
#pragma once

#include "cuda_emu.h"

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

// CCPL_EMU_UCONTEXT forces the portable context switch (to test it on x86-64).
#if defined(__x86_64__) && !defined(CCPL_EMU_UCONTEXT)
#define CCPL_EMU_SWITCH_X86_64 1
#else
#include <ucontext.h>
#endif

namespace ccpl_emu {

constexpr uint32_t kWarp = 32;
constexpr uint32_t kMaxThreads = 1024;
// Shared memory of a block (static and dynamic together): 48 KiB unless the launch opted in
// (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES), then the architecture's maximum
// (cudaDevAttrMaxSharedMemoryPerBlockOptin; CUDA C++ Programming Guide, compute capabilities).
constexpr uint32_t kSharedWithoutOptIn = 48 * 1024;
constexpr uint32_t kSharedOptInMax = 1024 * (kArch >= 90 ? 227 : kArch == 80 ? 163 : kArch >= 86 ? 99 : 64);
// Bytes after the dynamic shared memory that must still be 0xFF when a block ends.
constexpr size_t kSharedRedZone = 4096;
constexpr size_t kStackBytes = 128 * 1024;

enum Status : int { kOk = 0, kUnknownKernel = 1, kParamsSize = 2, kBadLaunch = 3, kKernelError = 4 };

// ---- Fibers' contexts (context.cpp) --------------------------------------------------------

#ifdef CCPL_EMU_SWITCH_X86_64
// A saved context is its stack pointer; the callee-saved registers, MXCSR and the x87
// control word sit on that stack (System V ABI). No system call, unlike swapcontext.
struct Context {
    void* sp = nullptr;
};
#else
// Other architectures: POSIX ucontext (correct, slower: each switch is a system call).
struct Context {
    ucontext_t uc;
};
#endif

// A fresh context that starts in entry() on the stack [base, base + size).
void context_init(Context& ctx, char* base, size_t size, void (*entry)());
void context_switch(Context& from, Context& to);

// ---- The sanitizer (memcheck.cpp, shadow.cpp) -------------------------------------------

// The checks, as the bits of ccpl_emu_launch's `checks` (emu/src/checks.rs names them).
enum Check : uint32_t { kMemcheck = 1, kInitcheck = 2, kRacecheck = 4 };

// One access as the shadows keep it: who, and where in the block's order. Valid only while
// `serial` is the current one (the block's for shared memory, the launch's for a buffer), so
// no shadow is ever cleared.
struct Access {
    uint32_t serial = 0;
    uint32_t block = 0;   // the block's number in the launch
    uint32_t epoch = 0;   // barriers the block completed before the access
    uint32_t clock = 0;   // the block's fences, atomics and barriers before it
    uint16_t thread = 0;  // linear index in the block; bit 15: an atomic
    uint16_t warp_epoch = 0;  // warp collectives the thread's warp completed before it
    int32_t code = 0;         // where in the kernel's code (describe_code)
};
constexpr uint16_t kAtomicBit = 0x8000;

// Per byte of a buffer or of shared memory: the last write, and a read not ordered before it.
struct Shadow {
    std::vector<Access> writes, reads;
};

// A buffer the launch was given: [begin, end), reached through the pointer at byte `param` of
// the parameter struct; `written`: a byte per byte, nonzero once written (global initcheck;
// the registry of emu/src/checks.rs owns them, across launches), or null when all were.
struct Buffer {
    uint64_t begin, end;
    uint32_t param;
    uint8_t* written;
    Shadow shadow;
};

// ---- Registries (launch.cpp) ---------------------------------------------------------------

struct Kernel {
    const char* name;
    const char* file;  // the source that defines it
    size_t params_size;
    void (*thunk)(const void*);
    bool instrumented;  // compiled with the sanitizer's hooks
    bool launched = false;
};

struct SharedVariable {
    void* address;
    size_t bytes;
    Shadow shadow;
};
// Function-local statics: registrations run during static initialisation, in any order.
std::vector<Kernel>& kernels();
std::vector<SharedVariable>& static_shared();

// ---- Launch state ---------------------------------------------------------------------------

enum class Wait : uint8_t { None, Barrier, Warp, Exited };

struct Fiber {
    Context ctx;
    char* stack = nullptr;
    uint32_t runnable_pos = 0;  // index in Launch::runnable while runnable
    Wait wait = Wait::None;
    uint32_t linear = 0;  // thread index in the block
    uint3 idx{};
    const char* file = nullptr;  // where it waits
    int line = 0;
    WarpOp op = WarpOp::Sync;
    int barrier_result = 0;
};

struct Lane {
    WarpOp op;
    unsigned mask;
    uint64_t value;
    int arg, width;
    const char* file;
    int line;
    uint64_t result;
};

struct Warp {
    unsigned present = 0;  // lanes that exist (the last warp of a block may be partial)
    unsigned arrived = 0;  // lanes waiting in a collective
    unsigned exited = 0;
    Lane lanes[kWarp];
};

const char* op_name(WarpOp op);

// xoshiro256** seeded through splitmix64.
struct Rng {
    uint64_t s[4];
    explicit Rng(uint64_t seed) {
        for (auto& word : s) {
            seed += 0x9e3779b97f4a7c15ull;
            uint64_t z = seed;
            z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
            z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
            word = z ^ (z >> 31);
        }
    }
    uint64_t next() {
        const uint64_t result = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = rotl(s[3], 45);
        return result;
    }
    uint32_t below(uint32_t n) { return static_cast<uint32_t>(((next() >> 32) * n) >> 32); }
    static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
};

enum class Policy : uint8_t { Uniform, WarpPriority, ThreadPriority };

struct Launch {
    Launch(const Kernel* kernel_, const void* params_, uint32_t threads_, uint64_t seed_)
        : kernel(kernel_), params(params_), threads(threads_), seed(seed_), rng(seed_) {}
    const Kernel* kernel;
    const void* params;
    uint32_t threads;
    uint64_t seed;
    Rng rng;
    std::vector<Fiber>* fibers = nullptr;
    std::vector<uint32_t> runnable;  // the runnable threads, in no order
    Policy policy = Policy::Uniform;
    std::vector<uint32_t> rank;     // priority rank of each thread, 0 the highest
    std::vector<uint32_t> by_rank;  // the thread of each rank
    std::vector<uint64_t> ready;    // bit r: the thread of rank r is runnable
    bool yielded = false;           // the last thread stopped at an atomic or a fence
    std::vector<Warp> warps;
    uint32_t exited = 0;
    // The barrier: arrivals so far, where, and the combined predicate.
    uint32_t barrier_arrived = 0;
    const char* barrier_file = nullptr;
    int barrier_line = 0;
    int barrier_op = 0, barrier_value = 0;
    Context scheduler;
    Fiber* current = nullptr;
    unsigned char* dynamic_shared = nullptr;
    uint32_t dynamic_bytes = 0;
    bool shared_opt_in = false;
    uint64_t id = 0;            // this launch's number (SharedRegistration::launch)
    size_t static_bytes = 0;    // static shared memory the launch's blocks reached so far
    std::string error;  // the first error; the launch stops at it
    // The sanitizer's checks (Check bits), the buffers the launch was given, and its order:
    // barriers completed in this block, warp collectives completed per warp, and a clock of
    // the block's fences, atomics and barriers.
    uint32_t checks = 0;
    std::vector<Buffer> buffers;
    Shadow dynamic_shadow;
    uint32_t block_number = 0;
    uint32_t block_serial = 0;  // unique to the block among all launches' (Access::serial)
    uint32_t barrier_epoch = 0;
    std::vector<uint16_t> warp_epochs;
    uint32_t clock = 0;
};

extern std::mutex g_launch_mutex;  // static shared memory and the fiber stacks are process-wide
extern Launch* g_launch;
extern uint64_t g_launches;

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
// "thread (x,y,z) of block (x,y,z)"
std::string where(const Fiber& f);

// ---- Scheduling (scheduler.cpp) -------------------------------------------------------------

// Lets the scheduler pick again while the current fiber stays runnable.
void reschedule(bool after_atomic);
// Stops the launch with `message` (the first error wins); never returns to the kernel.
[[noreturn]] void abort_launch(std::string message);
// Blocks the current fiber until another makes it runnable again.
void block_current(Wait wait, const char* file, int line);
// All lanes of `mask` have arrived: every one gets its result and runs again.
void complete_collective(Launch& L, Warp& warp, unsigned mask, uint32_t warp_base);
// Every thread of the block is at the barrier: all run again.
void complete_barrier(Launch& L);
// ---- The sanitizer's order and shadows (shadow.cpp) ------------------------------------------

// A new launch, a new block; the current thread's fence, atomic (after its access is checked).
void shadow_begin_launch(Launch& L);
void shadow_begin_block(Launch& L);
void shadow_fence(Launch& L);
void shadow_atomic(Launch& L, uint64_t address);
// Bytes [offset, offset + bytes) of `shadow` accessed at `address` by the current thread:
// initcheck (shared memory) and racecheck; `shared` says which memory.
void shadow_access(Launch& L, Shadow& shadow, size_t offset, size_t bytes, bool write, bool atomic,
                   bool shared, uint64_t address, const void* code);
// Bytes [offset, offset + bytes) of the buffer `b` accessed at `address` by the current thread
// (an atomic reads and writes): global initcheck, for a buffer with written bytes.
void initcheck_global(Launch& L, Buffer& b, size_t offset, size_t bytes, bool write, bool atomic, uint64_t address,
                      const void* code);
// "in function+0x1a" for an access's code.
std::string describe_code(int32_t code);
int32_t code_of(const void* pc);

// Runs block number `block` to completion; false (with L.error set) on an error or a deadlock.
bool run_block(Launch& L, uint64_t block);

// The shared memory limits of a launch with `static_bytes` of static shared memory (those its
// blocks reached so far): an empty string when they hold, else why not (launch.cpp).
std::string shared_limits(size_t static_bytes, uint32_t dynamic, bool opt_in);

}  // namespace ccpl_emu
