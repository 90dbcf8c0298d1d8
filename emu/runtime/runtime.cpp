// runtime.cpp: the CPU emulator's launch. Blocks run one after another on the calling OS
// thread; the threads of a block are fibers, each on its own stack, switched at every barrier,
// warp collective, atomic and fence by a scheduler seeded by the launch. Barriers and warp
// collectives have CUDA's semantics per thread: every thread of the block (every lane named in
// the mask) must arrive, and anything else is reported as an error instead of hanging.
//
// The scheduler's policy changes from block to block (seed + block index, modulo 3), because
// races need different schedules to show: a uniformly random pick among the runnable threads
// (a reader overtakes a writer), or random priorities of warps or of single threads, redrawn
// at every barrier, so that one warp or thread runs far ahead of the others (a warp reuses a
// buffer others still read). After an atomic or a fence the pick is uniform in every policy,
// so a thread spinning on a flag cannot starve the thread that would set it.
#include "cuda_emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
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

Coordinates g_coords;

namespace {

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

// ---- Context switching ------------------------------------------------------------------

#ifdef CCPL_EMU_SWITCH_X86_64
// A saved context is its stack pointer; the callee-saved registers, MXCSR and the x87
// control word sit on that stack (System V ABI). No system call, unlike swapcontext.
struct Context {
    void* sp = nullptr;
};
extern "C" void ccpl_emu_switch_context(void** save_sp, void* load_sp);
extern "C" void ccpl_emu_fiber_start();
asm(R"(
    .pushsection .text.ccpl_emu_switch_context, "ax", @progbits
    .p2align 4
    .hidden ccpl_emu_switch_context
    .type ccpl_emu_switch_context, @function
ccpl_emu_switch_context:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size ccpl_emu_switch_context, .-ccpl_emu_switch_context

    .p2align 4
    .hidden ccpl_emu_fiber_start
    .type ccpl_emu_fiber_start, @function
ccpl_emu_fiber_start:
    callq *%r12
    ud2
    .size ccpl_emu_fiber_start, .-ccpl_emu_fiber_start
    .popsection
)");

// A fresh context that starts in entry() on the stack [base, base + size).
void context_init(Context& ctx, char* base, size_t size, void (*entry)()) {
    auto* top = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(base + size) & ~uintptr_t{15});
    uint32_t control[2];
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(control[0]), "=m"(control[1]));
    uint64_t* sp = top - 8;
    memcpy(&sp[0], control, 8);                       // MXCSR, x87 control word
    sp[1] = sp[2] = sp[3] = 0;                        // r15, r14, r13
    sp[4] = reinterpret_cast<uint64_t>(entry);        // r12
    sp[5] = sp[6] = 0;                                // rbx, rbp
    sp[7] = reinterpret_cast<uint64_t>(&ccpl_emu_fiber_start);  // return address
    ctx.sp = sp;
}
void context_switch(Context& from, Context& to) { ccpl_emu_switch_context(&from.sp, to.sp); }
#else
// Other architectures: POSIX ucontext (correct, slower: each switch is a system call).
struct Context {
    ucontext_t uc;
};
void context_init(Context& ctx, char* base, size_t size, void (*entry)()) {
    getcontext(&ctx.uc);
    ctx.uc.uc_stack.ss_sp = base;
    ctx.uc.uc_stack.ss_size = size;
    ctx.uc.uc_link = nullptr;
    makecontext(&ctx.uc, entry, 0);
}
void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ---- Registries --------------------------------------------------------------------------

struct Kernel {
    const char* name;
    size_t params_size;
    void (*thunk)(const void*);
};

// Function-local statics: registrations run during static initialisation, in any order.
std::vector<Kernel>& kernels() {
    static std::vector<Kernel> list;
    return list;
}
struct SharedVariable {
    void* address;
    size_t bytes;
};
std::vector<SharedVariable>& static_shared() {
    static std::vector<SharedVariable> list;
    return list;
}

// ---- Launch state -------------------------------------------------------------------------

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

const char* op_name(WarpOp op) {
    switch (op) {
        case WarpOp::Sync: return "__syncwarp";
        case WarpOp::ShflIdx: return "__shfl_sync";
        case WarpOp::ShflUp: return "__shfl_up_sync";
        case WarpOp::ShflDown: return "__shfl_down_sync";
        case WarpOp::ShflXor: return "__shfl_xor_sync";
        case WarpOp::Ballot: return "__ballot_sync";
        case WarpOp::Any: return "__any_sync";
        case WarpOp::All: return "__all_sync";
    }
    return "?";
}

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
};

std::mutex g_launch_mutex;  // static shared memory and the fiber stacks are process-wide
Launch* g_launch = nullptr;
uint64_t g_launches = 0;

// Fiber stacks, each with a guard page below it, kept for later launches.
std::vector<Fiber>& fiber_pool(uint32_t threads) {
    static std::vector<Fiber> pool;
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    while (pool.size() < threads) {
        void* mem = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (mem == MAP_FAILED) break;
        mprotect(mem, page, PROT_NONE);
        pool.emplace_back();
        pool.back().stack = static_cast<char*>(mem) + page;
    }
    return pool;
}

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
    char buffer[1024];
    va_list args;
    va_start(args, fmt);
    vsnprintf(buffer, sizeof buffer, fmt, args);
    va_end(args);
    return buffer;
}

std::string where(const Fiber& f) {
    const uint3 b = g_coords.block_idx;
    return format("thread (%u,%u,%u) of block (%u,%u,%u)", f.idx.x, f.idx.y, f.idx.z, b.x, b.y, b.z);
}

void make_runnable(Launch& L, Fiber& f) {
    f.wait = Wait::None;
    f.runnable_pos = static_cast<uint32_t>(L.runnable.size());
    L.runnable.push_back(f.linear);
    const uint32_t r = L.rank[f.linear];
    L.ready[r / 64] |= uint64_t{1} << (r % 64);
}
void remove_runnable(Launch& L, Fiber& f) {
    const uint32_t last = L.runnable.back();
    L.runnable[f.runnable_pos] = last;
    (*L.fibers)[last].runnable_pos = f.runnable_pos;
    L.runnable.pop_back();
    const uint32_t r = L.rank[f.linear];
    L.ready[r / 64] &= ~(uint64_t{1} << (r % 64));
}

// New random priorities for the priority policies: warps in random order, each warp's lanes
// together (WarpPriority), or all threads in random order (ThreadPriority).
void draw_priorities(Launch& L) {
    if (L.policy == Policy::Uniform) return;
    const auto shuffle = [&L](uint32_t* first, uint32_t n) {
        for (uint32_t i = n; i > 1; --i) std::swap(first[i - 1], first[L.rng.below(i)]);
    };
    for (uint32_t t = 0; t < L.threads; ++t) L.by_rank[t] = t;
    if (L.policy == Policy::ThreadPriority) {
        shuffle(L.by_rank.data(), L.threads);
    } else {
        std::vector<uint32_t> warps((L.threads + kWarp - 1) / kWarp);
        for (uint32_t w = 0; w < warps.size(); ++w) warps[w] = w;
        shuffle(warps.data(), static_cast<uint32_t>(warps.size()));
        uint32_t r = 0;
        for (uint32_t w : warps) {
            const uint32_t first = r;
            for (uint32_t t = w * kWarp; t < std::min(L.threads, (w + 1) * kWarp); ++t) L.by_rank[r++] = t;
            shuffle(&L.by_rank[first], r - first);
        }
    }
    std::fill(L.ready.begin(), L.ready.end(), 0);
    for (uint32_t r = 0; r < L.threads; ++r) L.rank[L.by_rank[r]] = r;
    for (uint32_t t : L.runnable) L.ready[L.rank[t] / 64] |= uint64_t{1} << (L.rank[t] % 64);
}

// The thread to run next (the runnable set is not empty).
uint32_t pick_next(Launch& L) {
    if (L.policy == Policy::Uniform || L.yielded) {
        return L.runnable[L.rng.below(static_cast<uint32_t>(L.runnable.size()))];
    }
    for (size_t word = 0;; ++word) {
        if (L.ready[word]) return L.by_rank[word * 64 + static_cast<uint32_t>(__builtin_ctzll(L.ready[word]))];
    }
}

// Back to the scheduler; returns when the scheduler picks this fiber again.
void switch_to_scheduler() {
    Launch& L = *g_launch;
    context_switch(L.current->ctx, L.scheduler);
}

// Lets the scheduler pick again while the current fiber stays runnable.
void reschedule(bool after_atomic) {
    g_launch->yielded = after_atomic;
    switch_to_scheduler();
}

// Stops the launch with `message` (the first error wins); never returns to the kernel.
[[noreturn]] void abort_launch(std::string message) {
    Launch& L = *g_launch;
    if (L.error.empty()) L.error = std::move(message);
    switch_to_scheduler();
    __builtin_unreachable();  // the scheduler never resumes a fiber after an error
}

// Blocks the current fiber until another makes it runnable again.
void block_current(Wait wait, const char* file, int line) {
    Launch& L = *g_launch;
    Fiber& f = *L.current;
    f.wait = wait;
    f.file = file;
    f.line = line;
    remove_runnable(L, f);
    L.yielded = false;
    switch_to_scheduler();
}

uint64_t shuffle_source(const Lane& me, unsigned lane, const Warp& warp, unsigned mask) {
    const unsigned width = static_cast<unsigned>(me.width);
    const unsigned segment = lane & ~(width - 1);
    unsigned source = lane;
    switch (me.op) {
        case WarpOp::ShflIdx: source = segment + (static_cast<unsigned>(me.arg) & (width - 1)); break;
        case WarpOp::ShflUp:
            if ((lane - segment) >= static_cast<unsigned>(me.arg)) source = lane - me.arg;
            break;
        case WarpOp::ShflDown:
            if ((lane - segment) + static_cast<unsigned>(me.arg) < width) source = lane + me.arg;
            break;
        case WarpOp::ShflXor: {
            const unsigned other = lane ^ static_cast<unsigned>(me.arg);
            if (other < segment + width) source = other;  // later segments: own value (CUDA)
            break;
        }
        default: break;
    }
    if (source >= kWarp || !(mask >> source & 1u)) {
        abort_launch(format("%s at %s:%d: lane %u reads lane %u, which is not in the mask 0x%08x (undefined on "
                            "a GPU)",
                            op_name(me.op), me.file, me.line, lane, source, mask));
    }
    return warp.lanes[source].value;
}

// All lanes of `mask` have arrived: every one gets its result and runs again.
void complete_collective(Launch& L, Warp& warp, unsigned mask, uint32_t warp_base) {
    unsigned ballot = 0;
    for (unsigned lane = 0; lane < kWarp; ++lane) {
        if ((mask >> lane & 1u) && warp.lanes[lane].value != 0) ballot |= 1u << lane;
    }
    for (unsigned lane = 0; lane < kWarp; ++lane) {
        if (!(mask >> lane & 1u)) continue;
        Lane& me = warp.lanes[lane];
        switch (me.op) {
            case WarpOp::Sync: me.result = 0; break;
            case WarpOp::Ballot: me.result = ballot; break;
            case WarpOp::Any: me.result = ballot != 0; break;
            case WarpOp::All: me.result = ballot == mask; break;
            default: me.result = shuffle_source(me, lane, warp, mask); break;
        }
    }
    warp.arrived &= ~mask;
    for (unsigned lane = 0; lane < kWarp; ++lane) {
        Fiber& f = (*L.fibers)[warp_base + lane];
        if ((mask >> lane & 1u) && &f != L.current) make_runnable(L, f);
    }
}

// Every thread of the block is at the barrier: all run again.
void complete_barrier(Launch& L) {
    for (uint32_t t = 0; t < L.threads; ++t) {
        Fiber& f = (*L.fibers)[t];
        f.barrier_result = L.barrier_value;
        if (&f != L.current) make_runnable(L, f);
    }
    L.barrier_arrived = 0;
    L.barrier_value = 0;
    draw_priorities(L);
}

// The first thing each fiber runs: the kernel, then its exit.
void fiber_main() {
    Launch& L = *g_launch;
    L.kernel->thunk(L.params);
    Fiber& f = *L.current;
    Warp& warp = L.warps[f.linear / kWarp];
    const unsigned bit = 1u << (f.linear % kWarp);
    for (unsigned lane = 0; lane < kWarp; ++lane) {
        const Lane& other = warp.lanes[lane];
        if ((warp.arrived >> lane & 1u) && (other.mask & bit)) {
            abort_launch(format("%s exited while lane %u waits for it in %s with mask 0x%08x", where(f).c_str(),
                                lane, op_name(other.op), other.mask));
        }
    }
    if (L.barrier_arrived > 0) {
        abort_launch(format("%s exited while %u threads wait at __syncthreads (%s:%d): a barrier every thread "
                            "of the block does not reach",
                            where(f).c_str(), L.barrier_arrived, L.barrier_file, L.barrier_line));
    }
    warp.exited |= bit;
    ++L.exited;
    f.wait = Wait::Exited;
    remove_runnable(L, f);
    L.yielded = false;
    switch_to_scheduler();
    __builtin_unreachable();  // an exited fiber is never picked again
}

// Runs block number `block` to completion; false (with L.error set) on an error or a deadlock.
bool run_block(Launch& L, uint64_t block) {
    L.policy = static_cast<Policy>((L.seed + block) % 3);
    L.rank.resize(L.threads);
    L.by_rank.resize(L.threads);
    L.ready.assign((L.threads + 63) / 64, 0);
    for (uint32_t t = 0; t < L.threads; ++t) L.rank[t] = L.by_rank[t] = t;
    L.yielded = false;
    L.runnable.clear();
    L.warps.assign((L.threads + kWarp - 1) / kWarp, Warp{});
    L.exited = 0;
    L.barrier_arrived = 0;
    L.barrier_value = 0;
    for (uint32_t t = 0; t < L.threads; ++t) {
        Fiber& f = (*L.fibers)[t];
        f.linear = t;
        const dim3 b = g_coords.block_dim;
        f.idx = uint3{t % b.x, (t / b.x) % b.y, t / (b.x * b.y)};
        context_init(f.ctx, f.stack, kStackBytes, fiber_main);
        L.warps[t / kWarp].present |= 1u << (t % kWarp);
        make_runnable(L, f);
    }
    draw_priorities(L);
    for (const SharedVariable& v : static_shared()) memset(v.address, 0xFF, v.bytes);
    memset(L.dynamic_shared, 0xFF, L.dynamic_bytes + kSharedRedZone);

    while (!L.runnable.empty() && L.error.empty()) {
        Fiber& f = (*L.fibers)[pick_next(L)];
        L.current = &f;
        g_coords.thread_idx = f.idx;
        context_switch(L.scheduler, f.ctx);
    }
    L.current = nullptr;
    if (!L.error.empty()) return false;
    if (L.exited != L.threads) {
        // Nobody can run: describe where the threads wait.
        const Fiber* first = nullptr;
        uint32_t at_barrier = 0, at_warp = 0;
        for (uint32_t t = 0; t < L.threads; ++t) {
            const Fiber& f = (*L.fibers)[t];
            if (f.wait == Wait::Exited) continue;
            (f.wait == Wait::Barrier ? at_barrier : at_warp) += 1;
            if (!first) first = &f;
        }
        L.error = format("deadlock: %u threads wait at __syncthreads, %u in warp collectives, %u have exited; "
                         "%s waits in %s at %s:%d",
                         at_barrier, at_warp, L.exited, where(*first).c_str(),
                         first->wait == Wait::Barrier ? "__syncthreads" : op_name(first->op), first->file,
                         first->line);
        return false;
    }
    for (size_t i = 0; i < kSharedRedZone; ++i) {
        if (L.dynamic_shared[L.dynamic_bytes + i] != 0xFF) {
            L.error = format("the kernel wrote past the end of its %u bytes of dynamic shared memory (byte %zu)",
                             L.dynamic_bytes, L.dynamic_bytes + i);
            return false;
        }
    }
    return true;
}

// The kernel registered as `name`; null when there is none, or two (two sources define it).
const Kernel* find_kernel(const char* name) {
    const Kernel* found = nullptr;
    for (const Kernel& k : kernels()) {
        if (strcmp(k.name, name) != 0) continue;
        if (found) return nullptr;
        found = &k;
    }
    return found;
}

std::string check_dims(const dim3& grid, const dim3& block) {
    if (!grid.x || !grid.y || !grid.z || !block.x || !block.y || !block.z) return "a grid or block dimension is 0";
    if (block.x > kMaxThreads || block.y > kMaxThreads || block.z > 64 ||
        uint64_t{block.x} * block.y * block.z > kMaxThreads) {
        return format("block (%u,%u,%u) exceeds the limits (x, y <= 1024, z <= 64, at most 1024 threads)",
                      block.x, block.y, block.z);
    }
    if (grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
        return format("grid (%u,%u,%u) exceeds the limits (x < 2^31, y, z <= 65535)", grid.x, grid.y, grid.z);
    }
    return {};
}

// The shared memory limits of a launch with `static_bytes` of static shared memory (those its
// blocks reached so far): an empty string when they hold, else why not.
std::string shared_limits(size_t static_bytes, uint32_t dynamic, bool opt_in) {
    const size_t total = static_bytes + dynamic;
    if (static_bytes > kSharedWithoutOptIn) {
        return format("%zu bytes of static shared memory exceed the %u a kernel may declare (ptxas refuses it)",
                      static_bytes, kSharedWithoutOptIn);
    }
    if (!opt_in && total > kSharedWithoutOptIn) {
        return format("%zu bytes of shared memory (%zu static, %u dynamic) exceed the %u a block may use without "
                      "opting in: the plan must set shared_opt_in (LaunchPlan::with_dynamic_shared)",
                      total, static_bytes, dynamic, kSharedWithoutOptIn);
    }
    if (total > kSharedOptInMax) {
        return format("%zu bytes of shared memory (%zu static, %u dynamic) exceed the %u a block may have on sm_%d",
                      total, static_bytes, dynamic, kSharedOptInMax, kArch);
    }
    return {};
}

int report(char* err, size_t err_len, int status, const std::string& message) {
    if (err && err_len) snprintf(err, err_len, "%s", message.c_str());
    return status;
}

}  // namespace

// ---- What the kernels call (cuda_emu.h) ---------------------------------------------------

uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* file,
                         int line) {
    Launch& L = *g_launch;
    Fiber& f = *L.current;
    Warp& warp = L.warps[f.linear / kWarp];
    const unsigned lane = f.linear % kWarp, bit = 1u << lane;
    const char* name = op_name(op);
    if (!(mask & bit)) {
        abort_launch(format("%s at %s:%d: the mask 0x%08x leaves out the calling lane %u (%s)", name, file, line,
                            mask, lane, where(f).c_str()));
    }
    if (mask & ~warp.present) {
        abort_launch(format("%s at %s:%d: the mask 0x%08x names lanes that do not exist (this warp has lanes "
                            "0x%08x; the block has %u threads)",
                            name, file, line, mask, warp.present, L.threads));
    }
    if (mask & warp.exited) {
        abort_launch(format("%s at %s:%d: the mask 0x%08x names lanes that have exited (0x%08x)", name, file, line,
                            mask, mask & warp.exited));
    }
    if (width < 1 || width > static_cast<int>(kWarp) || (width & (width - 1))) {
        abort_launch(format("%s at %s:%d: width %d is not a power of 2 in 1..32", name, file, line, width));
    }
    for (unsigned other = 0; other < kWarp; ++other) {
        const Lane& o = warp.lanes[other];
        if ((warp.arrived >> other & 1u) && (o.mask & mask) && (o.mask != mask || o.op != op)) {
            abort_launch(format("divergent warp collectives: lane %u is in %s with mask 0x%08x at %s:%d while lane "
                                "%u waits in %s with mask 0x%08x",
                                lane, name, mask, file, line, other, op_name(o.op), o.mask));
        }
    }
    warp.lanes[lane] = Lane{op, mask, value, arg, width, file, line, 0};
    warp.arrived |= bit;
    if ((warp.arrived & mask) == mask) {
        complete_collective(L, warp, mask, f.linear - lane);
        reschedule(false);
    } else {
        f.op = op;
        block_current(Wait::Warp, file, line);
    }
    return warp.lanes[lane].result;
}

int sync_threads(int op, int predicate, const char* file, int line) {
    Launch& L = *g_launch;
    Fiber& f = *L.current;
    if (L.exited > 0) {
        abort_launch(format("__syncthreads at %s:%d: %s arrives after %u threads of the block exited, so the "
                            "barrier can never complete",
                            file, line, where(f).c_str(), L.exited));
    }
    if (L.barrier_arrived == 0) {
        L.barrier_file = file;
        L.barrier_line = line;
        L.barrier_op = op;
        L.barrier_value = op == 2 ? 1 : 0;
    } else if (L.barrier_line != line || strcmp(L.barrier_file, file) != 0 || L.barrier_op != op) {
        abort_launch(format("divergent __syncthreads: %s is at %s:%d while %u threads wait at %s:%d", where(f).c_str(),
                            file, line, L.barrier_arrived, L.barrier_file, L.barrier_line));
    }
    switch (op) {
        case 1: L.barrier_value += predicate != 0; break;
        case 2: L.barrier_value &= predicate != 0; break;
        case 3: L.barrier_value |= predicate != 0; break;
        default: break;
    }
    if (++L.barrier_arrived == L.threads) {
        complete_barrier(L);
        reschedule(false);
    } else {
        block_current(Wait::Barrier, file, line);
    }
    return f.barrier_result;
}

void yield_point() { reschedule(true); }

void fail(const char* what, const char* file, int line) {
    abort_launch(format("%s at %s:%d (%s)", what, file, line, where(*g_launch->current).c_str()));
}

void* dynamic_shared() { return g_launch->dynamic_shared; }

const char* message(const char* fmt, ...) {
    static thread_local char buffer[1024];
    va_list args;
    va_start(args, fmt);
    vsnprintf(buffer, sizeof buffer, fmt, args);
    va_end(args);
    return buffer;
}

MmaMemo& mma_memo() {
    static MmaMemo memos[kMaxThreads / kWarp];
    return memos[g_launch->current->linear / kWarp];
}

KernelRegistration::KernelRegistration(const char* name, size_t params_size, void (*thunk)(const void*)) {
    kernels().push_back(Kernel{name, params_size, thunk});
}

SharedRegistration::SharedRegistration(void* address, size_t bytes_) : bytes(bytes_) {
    static_shared().push_back(SharedVariable{address, bytes});
    memset(address, 0xFF, bytes);  // registered mid-block when first reached: NaN from here on
}

void SharedRegistration::use(const char* file, int line) {
    Launch* L = g_launch;
    if (!L || launch == L->id) return;  // namespace scope (static initialisation), or counted
    launch = L->id;
    L->static_bytes += bytes;
    const std::string bad = shared_limits(L->static_bytes, L->dynamic_bytes, L->shared_opt_in);
    if (!bad.empty()) abort_launch(format("%s (at the __shared__ declaration %s:%d)", bad.c_str(), file, line));
}

}  // namespace ccpl_emu

// ---- C ABI (src/emu.rs) ---------------------------------------------------------------------

using namespace ccpl_emu;

// Runs kernel `name` on the CPU: grid and block as in CUDA, `shared_bytes` of dynamic shared
// memory, `params` the kernel's parameter struct (its size checked against the kernel's).
// Returns 0, or an error code with a message in `err`.
extern "C" int ccpl_emu_launch(const char* name, const uint32_t grid[3], const uint32_t block[3],
                               uint32_t shared_bytes, int32_t shared_opt_in, const void* params, size_t params_size,
                               uint64_t seed, char* err, size_t err_len) {
    std::lock_guard<std::mutex> lock(g_launch_mutex);
    const Kernel* kernel = find_kernel(name);
    if (!kernel) return report(err, err_len, kUnknownKernel, format("no kernel named %s in the emulator (or more than one)", name));
    if (kernel->params_size != params_size) {
        return report(err, err_len, kParamsSize,
                      format("%s takes a %zu-byte parameter struct, got %zu bytes", name, kernel->params_size,
                             params_size));
    }
    const dim3 g(grid[0], grid[1], grid[2]), b(block[0], block[1], block[2]);
    std::string bad = check_dims(g, b);
    if (bad.empty()) bad = shared_limits(0, shared_bytes, shared_opt_in != 0);
    if (!bad.empty()) return report(err, err_len, kBadLaunch, format("%s: %s", name, bad.c_str()));

    Launch L(kernel, params, b.x * b.y * b.z, seed);
    L.dynamic_bytes = shared_bytes;
    L.shared_opt_in = shared_opt_in != 0;
    L.id = ++g_launches;
    L.fibers = &fiber_pool(L.threads);
    if (L.fibers->size() < L.threads) {
        return report(err, err_len, kBadLaunch, format("%s: could not map stacks for %u threads", name, L.threads));
    }
    std::vector<unsigned char> dynamic(shared_bytes + kSharedRedZone + 256);
    L.dynamic_shared = dynamic.data() + (256 - reinterpret_cast<uintptr_t>(dynamic.data()) % 256);
    g_launch = &L;
    g_coords.block_dim = b;
    g_coords.grid_dim = g;
    bool ok = true;
    uint64_t block_number = 0;
    for (uint32_t z = 0; ok && z < g.z; ++z) {
        for (uint32_t y = 0; ok && y < g.y; ++y) {
            for (uint32_t x = 0; ok && x < g.x; ++x) {
                g_coords.block_idx = uint3{x, y, z};
                ok = run_block(L, block_number++);
            }
        }
    }
    g_launch = nullptr;
    if (!ok) return report(err, err_len, kKernelError, format("%s: %s", name, L.error.c_str()));
    return kOk;
}

// One element of an mma_sync as the tensor cores of sm_{arch} add (hmma.h): c + sum a[k] b[k]
// for k < K, the inputs __nv_bfloat16 values when bf16, else __half ones (exact in double).
extern "C" float ccpl_emu_hmma_dot(int32_t arch, int32_t bf16, float c, const double* a, const double* b, int32_t K) {
    return hmma_dot(hmma_model(arch), bf16 ? input_emin<__nv_bfloat16>() : input_emin<__half>(), c, a, b, K);
}

// The registered kernels, for tests that compare them with the GPU images.
extern "C" size_t ccpl_emu_kernel_count() { return kernels().size(); }
extern "C" const char* ccpl_emu_kernel_name(size_t i) { return i < kernels().size() ? kernels()[i].name : nullptr; }

// ---- Misaligned accesses ---------------------------------------------------------------------
//
// emu/build.rs compiles the kernels with -fsanitize=alignment: every load and store through a
// typed pointer checks the type's alignment, and a misaligned one calls this handler (GCC's and
// Clang's UBSan ABI), defined here instead of linking the sanitizer runtime. Inside a launch it
// ends the launch with the kernel's file and line; elsewhere (the runtime itself) it aborts.

namespace {
struct SourceLocation {
    const char* file;
    uint32_t line;
    uint32_t column;
};
struct TypeDescriptor {
    uint16_t kind;
    uint16_t info;
    char name[1];
};
struct TypeMismatchData {
    SourceLocation location;
    const TypeDescriptor* type;
    unsigned char log_alignment;
    unsigned char check_kind;
};
}  // namespace

extern "C" void __ubsan_handle_type_mismatch_v1(TypeMismatchData* data, uintptr_t pointer) {
    const unsigned long alignment = 1ul << data->log_alignment;
    const char* what = pointer == 0 ? "a null pointer is dereferenced" : "a misaligned access";
    const std::string message =
        format("%s: address 0x%lx for type %s, which needs %lu-byte alignment", what,
               static_cast<unsigned long>(pointer), data->type->name, alignment);
    if (g_launch && g_launch->current) {
        abort_launch(format("%s at %s:%u (%s)", message.c_str(), data->location.file, data->location.line,
                            where(*g_launch->current).c_str()));
    }
    fprintf(stderr, "ccpl-emu: %s at %s:%u\n", message.c_str(), data->location.file, data->location.line);
    abort();
}
extern "C" void __ubsan_handle_type_mismatch_v1_abort(TypeMismatchData* data, uintptr_t pointer) {
    __ubsan_handle_type_mismatch_v1(data, pointer);
    abort();
}
