// memcheck.cpp: every memory access of a kernel, checked against the memory the launch may
// reach (the sanitizer's memcheck), then handed to the shadows (shadow.cpp).
//
// emu/build.rs compiles the kernels (not this runtime) with GCC's -fsanitize=thread: before
// every load and store that survives optimisation the compiler calls __tsan_read4,
// __tsan_write8 and the like with the address, defined here instead of linking the
// sanitizer's runtime. An access of a fiber to its own stack (locals, the parameter copy)
// or to the program's static data (constants, g_coords) is fine; one to shared memory must lie
// inside the block's; any other must lie inside a buffer the launch was given (a pointer of its
// parameter struct points into it), else the launch ends with an error naming the access, the
// thread, the block and the nearest buffer. Atomics come through atomic_access (cuda_emu.h).
#include "runtime.h"

#include <link.h>

#include <algorithm>
#include <cstdlib>

namespace ccpl_emu {

namespace {

struct Segment {
    uintptr_t begin, end;
};

int add_segments(dl_phdr_info* info, size_t, void* data) {
    auto& segments = *static_cast<std::vector<Segment>*>(data);
    for (int i = 0; i < info->dlpi_phnum; ++i) {
        const ElfW(Phdr)& h = info->dlpi_phdr[i];
        if (h.p_type == PT_LOAD) segments.push_back({info->dlpi_addr + h.p_vaddr, info->dlpi_addr + h.p_vaddr + h.p_memsz});
    }
    return 0;
}

// The loaded images' segments (code, constants, static data), sorted; taken at the first
// checked launch, when every library with kernels is loaded.
const std::vector<Segment>& image_segments() {
    static const std::vector<Segment> segments = [] {
        std::vector<Segment> found;
        dl_iterate_phdr(add_segments, &found);
        std::sort(found.begin(), found.end(), [](const Segment& a, const Segment& b) { return a.begin < b.begin; });
        return found;
    }();
    return segments;
}

bool in_image(uintptr_t address) {
    const auto& segments = image_segments();
    auto after = std::upper_bound(segments.begin(), segments.end(), address,
                                  [](uintptr_t a, const Segment& s) { return a < s.begin; });
    return after != segments.begin() && address < (after - 1)->end;
}

std::string access_text(const Launch& L, uintptr_t address, size_t bytes, bool write, const void* code) {
    return format("the %zu-byte %s at 0x%lx by %s (%s)", bytes, write ? "write" : "read",
                  static_cast<unsigned long>(address), where(*L.current).c_str(), describe_code(code_of(code)).c_str());
}

// The buffer of the launch nearest to `address`, and how far.
std::string nearest_buffer(const Launch& L, uintptr_t address) {
    const Buffer* nearest = nullptr;
    uint64_t distance = UINT64_MAX;
    for (const Buffer& b : L.buffers) {
        const uint64_t d = address < b.begin ? b.begin - address : address - b.end;
        if (d < distance) distance = d, nearest = &b;
    }
    if (!nearest) return "the launch was given no buffer";
    return format("the nearest is the buffer of the pointer at byte %u of the parameters (0x%lx, %lu bytes), "
                  "%lu bytes %s",
                  nearest->param, static_cast<unsigned long>(nearest->begin),
                  static_cast<unsigned long>(nearest->end - nearest->begin), static_cast<unsigned long>(distance),
                  address < nearest->begin ? "before its start" : address >= nearest->end ? "past its end" : "inside it");
}

// The static shared variable at `address`, or null: a binary search of the variables by
// address, re-sorted when one has registered since (a block reached a new declaration).
SharedVariable* static_variable(uintptr_t address) {
    static std::vector<SharedVariable*> sorted;
    std::vector<SharedVariable>& all = static_shared();
    if (sorted.size() != all.size()) {
        sorted.clear();
        for (SharedVariable& v : all) sorted.push_back(&v);
        std::sort(sorted.begin(), sorted.end(),
                  [](const SharedVariable* a, const SharedVariable* b) { return a->address < b->address; });
    }
    auto after = std::upper_bound(sorted.begin(), sorted.end(), address, [](uintptr_t a, const SharedVariable* v) {
        return a < reinterpret_cast<uintptr_t>(v->address);
    });
    if (after == sorted.begin()) return nullptr;
    SharedVariable* v = *(after - 1);
    return address - reinterpret_cast<uintptr_t>(v->address) < v->bytes ? v : nullptr;
}

// Shared memory [begin, begin + size) accessed: inside it, or an error.
void shared_access(Launch& L, Shadow& shadow, uintptr_t begin, size_t size, uintptr_t address, size_t bytes,
                   bool write, bool atomic, const void* code) {
    if (address + bytes > begin + size) {
        abort_launch(format("memcheck: %s ends past the %zu bytes of shared memory at 0x%lx (byte %lu of it)",
                            access_text(L, address, bytes, write, code).c_str(), size,
                            static_cast<unsigned long>(begin), static_cast<unsigned long>(address - begin)));
    }
    shadow_access(L, shadow, address - begin, bytes, write, atomic, true, address, code);
}

void check_access(uintptr_t address, size_t bytes, bool write, bool atomic, const void* code) {
    Launch* launch = g_launch;
    if (!launch || !launch->checks || !launch->current) return;
    Launch& L = *launch;
    // The fiber's stack, and the thread coordinates (threadIdx and the like): the most frequent.
    if (address - reinterpret_cast<uintptr_t>(L.current->stack) < kStackBytes) return;
    if (address - reinterpret_cast<uintptr_t>(&g_coords) < sizeof g_coords) return;
    const uintptr_t dynamic = reinterpret_cast<uintptr_t>(L.dynamic_shared);
    if (address - dynamic < L.dynamic_bytes + kSharedRedZone) {
        return shared_access(L, L.dynamic_shadow, dynamic, L.dynamic_bytes, address, bytes, write, atomic, code);
    }
    for (Buffer& b : L.buffers) {
        if (address < b.begin || address >= b.end) continue;
        if (address + bytes > b.end) {
            abort_launch(format("memcheck: %s ends past the buffer of the pointer at byte %u of the parameters "
                                "(0x%lx, %lu bytes)",
                                access_text(L, address, bytes, write, code).c_str(), b.param,
                                static_cast<unsigned long>(b.begin), static_cast<unsigned long>(b.end - b.begin)));
        }
        if (b.written && (L.checks & kInitcheck)) {
            initcheck_global(L, b, address - b.begin, bytes, write, atomic, address, code);
        }
        return shadow_access(L, b.shadow, address - b.begin, bytes, write, atomic, false, address, code);
    }
    if (SharedVariable* v = static_variable(address)) {
        return shared_access(L, v->shadow, reinterpret_cast<uintptr_t>(v->address), v->bytes, address, bytes, write,
                             atomic, code);
    }
    const uintptr_t params = reinterpret_cast<uintptr_t>(L.params);
    if (address - params < L.kernel->params_size || in_image(address)) return;
    abort_launch(format("memcheck: %s is outside every buffer the launch was given and its shared memory; %s",
                        access_text(L, address, bytes, write, code).c_str(), nearest_buffer(L, address).c_str()));
}

}  // namespace

void atomic_access(void* address, size_t bytes, const void* code) {
    check_access(reinterpret_cast<uintptr_t>(address), bytes, true, true, code);
    if (g_launch && (g_launch->checks & kRacecheck)) shadow_atomic(*g_launch, reinterpret_cast<uint64_t>(address));
}

}  // namespace ccpl_emu

using ccpl_emu::check_access;

// The hooks of GCC's -fsanitize=thread instrumentation: every access of a kernel, its address
// and size, from the code that returns to the caller's next instruction.
#define CCPL_EMU_HOOK(name, bytes, write)                                             \
    extern "C" void name(uintptr_t a) { check_access(a, bytes, write, false, __builtin_return_address(0)); }
#define CCPL_EMU_HOOKS(bytes)                                 \
    CCPL_EMU_HOOK(__tsan_read##bytes, bytes, false)           \
    CCPL_EMU_HOOK(__tsan_write##bytes, bytes, true)           \
    CCPL_EMU_HOOK(__tsan_unaligned_read##bytes, bytes, false) \
    CCPL_EMU_HOOK(__tsan_unaligned_write##bytes, bytes, true)
CCPL_EMU_HOOKS(1)
CCPL_EMU_HOOKS(2)
CCPL_EMU_HOOKS(4)
CCPL_EMU_HOOKS(8)
CCPL_EMU_HOOKS(16)
#undef CCPL_EMU_HOOKS
#undef CCPL_EMU_HOOK
extern "C" void __tsan_read_range(uintptr_t a, size_t bytes) {
    check_access(a, bytes, false, false, __builtin_return_address(0));
}
extern "C" void __tsan_write_range(uintptr_t a, size_t bytes) {
    check_access(a, bytes, true, false, __builtin_return_address(0));
}
// Each instrumented unit's initialiser calls it: the hooks need nothing set up.
extern "C" void __tsan_init() {}
// The guard of a function-local static's initialisation (the static __shared__ holders): read
// as the compiler would without the instrumentation.
extern "C" char __tsan_atomic8_load(const volatile char* a, int) { return __atomic_load_n(a, __ATOMIC_ACQUIRE); }
