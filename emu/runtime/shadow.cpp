// shadow.cpp: the sanitizer's initcheck and racecheck, on a shadow of every byte that a kernel
// accesses (memcheck.cpp hands each access here), and the order between accesses they use.
//
// initcheck: shared memory is unwritten when a block starts; a read of a byte that no thread of
// the block wrote since is an error. A buffer the launch was given is written (host data the
// caller uploaded) unless the caller marked it unwritten (emu/src/lib.rs, mark_unwritten: a
// fresh allocation, or an output it poisoned); then each of its bytes is unwritten until an
// access of a launch writes it, and a read (or an atomic) of one before is an error.
//
// racecheck: each byte keeps its last write and a read not ordered before it. An access by
// another thread conflicts with them (a write with either, a read with the write) unless both
// are atomics or the earlier one happens before the later:
// - in one block: a __syncthreads() completed between them, or a warp collective of their warp
//   (shuffle, vote, __syncwarp) when both threads are in one warp;
// - between blocks (global memory only): the earlier block released it and the later block
//   acquired that release. A release is an atomic on an address C by a thread after its
//   __threadfence(): it covers that thread's accesses before its fence, and the accesses of
//   the block's other threads that a fence of theirs followed, both separated from the atomic
//   by a barrier. An acquire is any atomic on C; it orders what the thread does after it, and
//   what the block does after the next barrier. This is the "last block" pattern the kernels
//   use (every block writes, fences and counts; the block that counts last reads).
// Blocks run one after another here, so this is the rule that makes a kernel correct whatever
// order a GPU runs them in: a race between blocks is reported whichever block ran first.
#include "runtime.h"

#include <dlfcn.h>

#include <cstdio>
#include <cstring>
#include <unordered_map>

extern "C" int ccpl_emu_launch(const char*, const uint32_t*, const uint32_t*, uint32_t, int32_t, const void*, size_t,
                               const uint64_t*, size_t, uint32_t, uint64_t, char*, size_t);

namespace ccpl_emu {

namespace {

// A release (see above) of block `block`: the atomic's thread, epoch and clock, and each
// thread's last fence before the atomic's epoch (clock + 1; 0 for none).
struct Release {
    uint32_t block, thread, epoch, clock;
    std::vector<uint32_t> fenced;
};
struct Acquire {
    uint64_t address;
    uint32_t thread, epoch, clock;
};

// The launch's order between blocks, and the current block's fences and acquires.
struct Order {
    std::unordered_map<uint64_t, std::vector<Release>> releases;  // by the atomic's address
    std::vector<uint32_t> fence_clock, fence_epoch;               // per thread: clock + 1 of its last fence
    std::vector<Acquire> acquires;
};
Order g_order;
uint32_t g_block_serials = 0;

uint32_t thread_of(const Access& a) { return a.thread & ~kAtomicBit; }

std::string block_text(const Launch&, uint32_t block) {
    const dim3 g = g_coords.grid_dim;
    return format("block (%u,%u,%u)", block % g.x, block / g.x % g.y, block / (g.x * g.y));
}
std::string thread_text(uint32_t linear) {
    const dim3 b = g_coords.block_dim;
    return format("thread (%u,%u,%u)", linear % b.x, linear / b.x % b.y, linear / (b.x * b.y));
}

bool after_acquire(const Access& now, const Acquire& a) {
    return (thread_of(now) == a.thread && now.clock > a.clock) || now.epoch > a.epoch;
}

// Whether the release `r` covers the access `a` of its block.
bool covers(const Release& r, const Access& a) {
    if (thread_of(a) == r.thread && a.clock <= r.clock && r.fenced[r.thread] > a.clock) return true;
    if (thread_of(a) == r.thread && a.clock == r.clock) return true;  // the releasing atomic itself
    return a.epoch < r.epoch && r.fenced[thread_of(a)] > a.clock;
}

// Whether `before` (an access of another block) happens before the current block's `now`.
bool released_to(const Access& before, const Access& now) {
    for (const Acquire& a : g_order.acquires) {
        if (!after_acquire(now, a)) continue;
        const auto found = g_order.releases.find(a.address);
        if (found == g_order.releases.end()) continue;
        for (const Release& r : found->second) {
            if (r.block == before.block && covers(r, before)) return true;
        }
    }
    return false;
}

bool happens_before(const Launch& L, const Access& before, const Access& now) {
    if (before.block != now.block) return released_to(before, now);
    if (thread_of(before) == thread_of(now) || before.epoch != now.epoch) return true;
    return thread_of(before) / kWarp == thread_of(now) / kWarp &&
           before.warp_epoch != L.warp_epochs[thread_of(now) / kWarp];
}

bool conflict(const Launch& L, const Access& before, const Access& now, uint32_t serial) {
    if (before.serial != serial) return false;
    if ((before.thread & kAtomicBit) && (now.thread & kAtomicBit)) return false;
    return !happens_before(L, before, now);
}

// `hazard`: "write-after-read" and the like, the earlier access's kind last.
[[noreturn]] void report_race(const Launch& L, const char* hazard, const Access& before, const Access& now,
                              bool shared, uint64_t address, size_t bytes, bool write) {
    const bool before_write = strncmp(strchr(hazard, '-') + 7, "write", 5) == 0;
    abort_launch(format("racecheck: %s hazard on %s memory at 0x%lx: the %zu-byte %s%s by %s of %s (%s) is not "
                        "ordered after the %s%s by %s of %s (%s)",
                        hazard, shared ? "shared" : "global", static_cast<unsigned long>(address), bytes,
                        now.thread & kAtomicBit ? "atomic " : "", write ? "write" : "read",
                        thread_text(thread_of(now)).c_str(), block_text(L, now.block).c_str(),
                        describe_code(now.code).c_str(), before.thread & kAtomicBit ? "atomic " : "",
                        before_write ? "write" : "read",
                        thread_text(thread_of(before)).c_str(), block_text(L, before.block).c_str(),
                        describe_code(before.code).c_str()));
}

}  // namespace

int32_t code_of(const void* pc) {
    return static_cast<int32_t>(reinterpret_cast<intptr_t>(pc) - reinterpret_cast<intptr_t>(&ccpl_emu_launch));
}

// The function and source line of the code, by addr2line on the image that holds it (an error
// is rare, and the kernels' functions are local symbols, which dladdr cannot name).
std::string describe_code(int32_t code) {
    const char* pc = reinterpret_cast<const char*>(&ccpl_emu_launch) + code;
    Dl_info info;
    if (!dladdr(pc, &info) || !info.dli_fname) return format("at %p", static_cast<const void*>(pc));
    // The call's own address, one byte before where it returns to.
    const uintptr_t offset = static_cast<uintptr_t>(pc - static_cast<const char*>(info.dli_fbase)) - 1;
    std::string found;
    const std::string command = format("addr2line -f -C -e '%s' 0x%lx 2>/dev/null", info.dli_fname,
                                       static_cast<unsigned long>(offset));
    if (FILE* out = popen(command.c_str(), "r")) {
        char line[512];
        while (fgets(line, sizeof line, out)) {
            line[strcspn(line, "\n")] = 0;
            found += found.empty() ? "in " : " at ";
            found += line;
        }
        pclose(out);
    }
    return found.empty() || found.find("??") != std::string::npos ? format("at %p", static_cast<const void*>(pc))
                                                                  : found;
}

void shadow_begin_launch(Launch&) { g_order.releases.clear(); }

void shadow_begin_block(Launch& L) {
    L.block_serial = ++g_block_serials;
    L.barrier_epoch = 0;
    L.clock = 0;
    L.warp_epochs.assign((L.threads + kWarp - 1) / kWarp, 0);
    g_order.fence_clock.assign(L.threads, 0);
    g_order.fence_epoch.assign(L.threads, 0);
    g_order.acquires.clear();
}

void shadow_fence(Launch& L) {
    const uint32_t t = L.current->linear;
    g_order.fence_clock[t] = ++L.clock;
    g_order.fence_epoch[t] = L.barrier_epoch;
}

void shadow_atomic(Launch& L, uint64_t address) {
    const uint32_t t = L.current->linear;
    g_order.acquires.push_back(Acquire{address, t, L.barrier_epoch, L.clock});
    if (!g_order.fence_clock[t]) return;  // a relaxed atomic: no release
    Release r{L.block_number, t, L.barrier_epoch, L.clock, std::vector<uint32_t>(L.threads, 0)};
    for (uint32_t u = 0; u < L.threads; ++u) {
        if (u == t || g_order.fence_epoch[u] < L.barrier_epoch) r.fenced[u] = g_order.fence_clock[u];
    }
    g_order.releases[address].push_back(std::move(r));
}

void initcheck_global(Launch& L, Buffer& b, size_t offset, size_t bytes, bool write, bool atomic, uint64_t address,
                      const void* code) {
    if (write && !atomic) return (void)memset(b.written + offset, 1, bytes);
    for (size_t i = offset; i < offset + bytes; ++i) {
        if (b.written[i]) continue;
        abort_launch(format("initcheck: the %zu-byte %s at 0x%lx by %s (%s) reads byte %zu of the buffer of the "
                            "pointer at byte %u of the parameters (0x%lx, %lu bytes), which nothing wrote since "
                            "its allocation",
                            bytes, atomic ? "atomic" : "read", static_cast<unsigned long>(address),
                            where(*L.current).c_str(), describe_code(code_of(code)).c_str(), i, b.param,
                            static_cast<unsigned long>(b.begin), static_cast<unsigned long>(b.end - b.begin)));
    }
    if (atomic) memset(b.written + offset, 1, bytes);
}

void shadow_access(Launch& L, Shadow& shadow, size_t offset, size_t bytes, bool write, bool atomic, bool shared,
                   uint64_t address, const void* code) {
    // Here initcheck is of shared memory (a buffer's is initcheck_global's); racecheck of both.
    if (!(L.checks & kRacecheck) && !(shared && (L.checks & kInitcheck))) return;
    const uint32_t serial = shared ? L.block_serial : static_cast<uint32_t>(L.id);
    if (atomic) ++L.clock;  // an atomic is a point of the block's order (shadow_atomic)
    Access now;
    now.serial = serial;
    now.block = L.block_number;
    now.epoch = L.barrier_epoch;
    now.clock = L.clock;
    now.thread = static_cast<uint16_t>(L.current->linear | (atomic ? kAtomicBit : 0));
    now.warp_epoch = L.warp_epochs[L.current->linear / kWarp];
    now.code = code_of(code);
    if (shadow.writes.size() < offset + bytes) {
        shadow.writes.resize(offset + bytes);
        shadow.reads.resize(offset + bytes);
    }
    const bool racecheck = L.checks & kRacecheck;
    for (size_t i = offset; i < offset + bytes; ++i) {
        Access& w = shadow.writes[i];
        Access& r = shadow.reads[i];
        if (shared && !write && (L.checks & kInitcheck) && w.serial != serial) {
            abort_launch(format("initcheck: the %zu-byte read of shared memory at 0x%lx by %s (%s) reads byte %zu, "
                                "which no thread of the block wrote",
                                bytes, static_cast<unsigned long>(address), where(*L.current).c_str(),
                                describe_code(now.code).c_str(), i - offset));
        }
        if (racecheck) {
            if (conflict(L, w, now, serial)) {
                report_race(L, write ? "write-after-write" : "read-after-write", w, now, shared, address, bytes, write);
            }
            if (write && conflict(L, r, now, serial)) {
                report_race(L, "write-after-read", r, now, shared, address, bytes, write);
            }
        }
        if (write) {
            w = now;
            r = Access{};
        } else if (r.serial != serial || happens_before(L, r, now)) {
            r = now;
        }
    }
}

}  // namespace ccpl_emu
