// misaligned.cpp: misaligned accesses reported as launch errors.
//
// emu/build.rs compiles the kernels with -fsanitize=alignment: every load and store through a
// typed pointer checks the type's alignment, and a misaligned one calls this handler (GCC's and
// Clang's UBSan ABI), defined here instead of linking the sanitizer runtime. Inside a launch it
// ends the launch with the kernel's file and line; elsewhere (the runtime itself) it aborts.
#include "runtime.h"

#include <cstdio>
#include <cstdlib>

using namespace ccpl_emu;

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

