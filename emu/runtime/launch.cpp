// launch.cpp: the C ABI (emu/src/library.rs calls it): a launch checked against CUDA's limits
// and run block by block; the registries of kernels and of static shared memory; the model of
// tensor-core products for the tests.
#include "runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace ccpl_emu {

Coordinates g_coords;

std::vector<Kernel>& kernels() {
    static std::vector<Kernel> list;
    return list;
}
std::vector<SharedVariable>& static_shared() {
    static std::vector<SharedVariable> list;
    return list;
}

std::mutex g_launch_mutex;  // static shared memory and the fiber stacks are process-wide
Launch* g_launch = nullptr;
uint64_t g_launches = 0;

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

namespace {

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

// The kernel registered as `name`; null when there is none, or two (two sources define it).
Kernel* find_kernel(const char* name) {
    Kernel* found = nullptr;
    for (Kernel& k : kernels()) {
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

// Appends the kernel's name and source to the file CCPL_EMU_LAUNCH_LOG names, at its first
// launch in the process: the planted-bug check learns from it which tests run which source.
void log_first_launch(Kernel& kernel) {
    if (kernel.launched) return;
    kernel.launched = true;
    const char* path = getenv("CCPL_EMU_LAUNCH_LOG");
    if (!path) return;
    if (FILE* log = fopen(path, "a")) {
        fprintf(log, "%s %s\n", kernel.name, kernel.file);
        fclose(log);
    }
}

int report(char* err, size_t err_len, int status, const std::string& message) {
    if (err && err_len) snprintf(err, err_len, "%s", message.c_str());
    return status;
}

}  // namespace

}  // namespace ccpl_emu

using namespace ccpl_emu;

// Runs kernel `name` on the CPU: grid and block as in CUDA, `shared_bytes` of dynamic shared
// memory, `params` the kernel's parameter struct (its size checked against the kernel's), the
// buffers it points into as `buffer_count` quadruples (start, end, the pointer's byte in
// `params`, the address of a byte per byte saying whether it was written, or 0: all were), the
// sanitizer's `checks` (Check bits). Returns 0, or an error code with a message
// in `err`.
extern "C" int ccpl_emu_launch(const char* name, const uint32_t grid[3], const uint32_t block[3],
                               uint32_t shared_bytes, int32_t shared_opt_in, const void* params, size_t params_size,
                               const uint64_t* buffers, size_t buffer_count, uint32_t checks, uint64_t seed,
                               char* err, size_t err_len) {
    std::lock_guard<std::mutex> lock(g_launch_mutex);
    Kernel* kernel = find_kernel(name);
    if (!kernel) return report(err, err_len, kUnknownKernel, format("no kernel named %s in the emulator (or more than one)", name));
    log_first_launch(*kernel);
    if (kernel->params_size != params_size) {
        return report(err, err_len, kParamsSize,
                      format("%s takes a %zu-byte parameter struct, got %zu bytes", name, kernel->params_size,
                             params_size));
    }
    if (checks && !kernel->instrumented) {
        return report(err, err_len, kBadLaunch,
                      format("%s: the sanitizer's checks were asked for, but its source (%s) was built without "
                             "their instrumentation: build ccpl-emu with CCPL_EMU_SANITIZE set (docs/sanitizer.md)",
                             name, kernel->file));
    }
    const dim3 g(grid[0], grid[1], grid[2]), b(block[0], block[1], block[2]);
    std::string bad = check_dims(g, b);
    if (bad.empty()) bad = shared_limits(0, shared_bytes, shared_opt_in != 0);
    if (!bad.empty()) return report(err, err_len, kBadLaunch, format("%s: %s", name, bad.c_str()));

    Launch L(kernel, params, b.x * b.y * b.z, seed);
    L.dynamic_bytes = shared_bytes;
    L.shared_opt_in = shared_opt_in != 0;
    L.id = ++g_launches;
    L.checks = checks;
    for (size_t i = 0; i < buffer_count; ++i) {
        const uint64_t* b = buffers + 4 * i;
        L.buffers.push_back(Buffer{b[0], b[1], static_cast<uint32_t>(b[2]), reinterpret_cast<uint8_t*>(b[3]), {}});
    }
    shadow_begin_launch(L);
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

