// builtins.cpp: what the kernels call (cuda_emu.h): barriers, warp collectives, yields at
// atomics and fences, errors, dynamic shared memory, and the registrations of kernels and of
// static shared memory.
#include "runtime.h"

#include <cstdarg>
#include <cstdio>
#include <cstring>

namespace ccpl_emu {

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

void thread_fence() {
    if (g_launch->checks & kRacecheck) shadow_fence(*g_launch);
    reschedule(true);
}

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

KernelRegistration::KernelRegistration(const char* name, const char* file, size_t params_size,
                                       void (*thunk)(const void*), bool instrumented) {
    kernels().push_back(Kernel{name, file, params_size, thunk, instrumented});
}

SharedRegistration::SharedRegistration(void* address, size_t bytes_) : bytes(bytes_) {
    static_shared().push_back(SharedVariable{address, bytes, {}});
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
