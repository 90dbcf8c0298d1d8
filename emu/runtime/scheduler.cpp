// scheduler.cpp: which of a block's threads runs next, and the block run to its end.
//
// The scheduler's policy changes from block to block (seed + block index, modulo 3), because
// races need different schedules to show: a uniformly random pick among the runnable threads
// (a reader overtakes a writer), or random priorities of warps or of single threads, redrawn
// at every barrier, so that one warp or thread runs far ahead of the others (a warp reuses a
// buffer others still read). After an atomic or a fence the pick is uniform in every policy,
// so a thread spinning on a flag cannot starve the thread that would set it.
#include "runtime.h"

#include <algorithm>
#include <cstring>

namespace ccpl_emu {

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


static void make_runnable(Launch& L, Fiber& f) {
    f.wait = Wait::None;
    f.runnable_pos = static_cast<uint32_t>(L.runnable.size());
    L.runnable.push_back(f.linear);
    const uint32_t r = L.rank[f.linear];
    L.ready[r / 64] |= uint64_t{1} << (r % 64);
}
static void remove_runnable(Launch& L, Fiber& f) {
    const uint32_t last = L.runnable.back();
    L.runnable[f.runnable_pos] = last;
    (*L.fibers)[last].runnable_pos = f.runnable_pos;
    L.runnable.pop_back();
    const uint32_t r = L.rank[f.linear];
    L.ready[r / 64] &= ~(uint64_t{1} << (r % 64));
}

// New random priorities for the priority policies: warps in random order, each warp's lanes
// together (WarpPriority), or all threads in random order (ThreadPriority).
static void draw_priorities(Launch& L) {
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
static uint32_t pick_next(Launch& L) {
    if (L.policy == Policy::Uniform || L.yielded) {
        return L.runnable[L.rng.below(static_cast<uint32_t>(L.runnable.size()))];
    }
    for (size_t word = 0;; ++word) {
        if (L.ready[word]) return L.by_rank[word * 64 + static_cast<uint32_t>(__builtin_ctzll(L.ready[word]))];
    }
}

// Back to the scheduler; returns when the scheduler picks this fiber again.
static void switch_to_scheduler() {
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

static uint64_t shuffle_source(const Lane& me, unsigned lane, const Warp& warp, unsigned mask) {
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
    ++L.warp_epochs[warp_base / kWarp];
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
    ++L.barrier_epoch;
    ++L.clock;
    draw_priorities(L);
}

// The first thing each fiber runs: the kernel, then its exit.
static void fiber_main() {
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
    L.block_number = static_cast<uint32_t>(block);
    shadow_begin_block(L);
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

}  // namespace ccpl_emu
