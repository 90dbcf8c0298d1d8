// context.cpp: the fibers' context switch. On x86-64 a few instructions (no system call, unlike
// swapcontext); elsewhere POSIX ucontext.
#include "runtime.h"

#include <cstring>

namespace ccpl_emu {

#ifdef CCPL_EMU_SWITCH_X86_64
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
void context_init(Context& ctx, char* base, size_t size, void (*entry)()) {
    getcontext(&ctx.uc);
    ctx.uc.uc_stack.ss_sp = base;
    ctx.uc.uc_stack.ss_size = size;
    ctx.uc.uc_link = nullptr;
    makecontext(&ctx.uc, entry, 0);
}
void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

}  // namespace ccpl_emu
