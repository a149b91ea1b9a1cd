/* The host's interrupt of a running session exec (KVMFORK_MB_INTERRUPT_ENTRY_OFF).
 *
 * When a session exec overruns its timeout, the VMM stops the vCPU while it
 * is in user mode (CPL 3), moves RSP below the 128-byte red zone, pushes the
 * interrupted RIP and resumes the vCPU at kvmfork_interrupt_entry: to the
 * interrupted code this is an asynchronous call it never made, like a
 * signal delivered without the guest kernel (entering the kernel would cost
 * emulated milliseconds on PVM hosts and needs a device). The entry saves
 * every general-purpose register, RFLAGS and the x87/SSE state (FXSAVE: the
 * guest kernel runs with `noxsave`, so there is no AVX state), calls
 * kvmfork_interrupt_handler on a 16-byte aligned stack, restores everything
 * and returns with `ret $128`, which pops the pushed RIP and skips the red
 * zone again.
 *
 * The handler asks CPython to raise KeyboardInterrupt in the main thread at
 * its next safe point (PyErr_SetInterruptEx: async-signal-safe, no
 * syscall), but only while the runner has opened the gate around user code
 * (kvmfork_runner.set_interruptible): an interrupt that lands in the
 * runner's own bookkeeping is dropped, as that work ends by itself within
 * microseconds. Whatever thread the vCPU was running, only the main thread
 * raises; a main thread blocked in the kernel (sleep, join, I/O) cannot be
 * interrupted this way (the VMM only interrupts at CPL 3).
 */
#include <Python.h>

#include <errno.h>
#include <signal.h>

#include "agent.h"

/* Every push below is 8 bytes; FXSAVE needs 512 bytes aligned to 16. */
__asm__(".text\n"
        ".globl kvmfork_interrupt_entry\n"
        ".hidden kvmfork_interrupt_entry\n"
        ".type kvmfork_interrupt_entry, @function\n"
        "kvmfork_interrupt_entry:\n"
        "    pushfq\n"
        "    pushq %rbp\n"
        "    movq %rsp, %rbp\n"
        "    pushq %rax\n"
        "    pushq %rbx\n"
        "    pushq %rcx\n"
        "    pushq %rdx\n"
        "    pushq %rsi\n"
        "    pushq %rdi\n"
        "    pushq %r8\n"
        "    pushq %r9\n"
        "    pushq %r10\n"
        "    pushq %r11\n"
        "    pushq %r12\n"
        "    pushq %r13\n"
        "    pushq %r14\n"
        "    pushq %r15\n"
        "    subq $528, %rsp\n"
        "    andq $-16, %rsp\n"
        "    fxsave64 (%rsp)\n"
        /* The C ABI at a call: DF clear, empty x87 stack, default MXCSR
         * (the interrupted code may be mid-way through any of them). */
        "    cld\n"
        "    fninit\n"
        "    movl $0x1f80, 512(%rsp)\n"
        "    ldmxcsr 512(%rsp)\n"
        "    call kvmfork_interrupt_handler\n"
        "    fxrstor64 (%rsp)\n"
        "    leaq -112(%rbp), %rsp\n"
        "    popq %r15\n"
        "    popq %r14\n"
        "    popq %r13\n"
        "    popq %r12\n"
        "    popq %r11\n"
        "    popq %r10\n"
        "    popq %r9\n"
        "    popq %r8\n"
        "    popq %rdi\n"
        "    popq %rsi\n"
        "    popq %rdx\n"
        "    popq %rcx\n"
        "    popq %rbx\n"
        "    popq %rax\n"
        "    popq %rbp\n"
        "    popfq\n"
        "    ret $128\n"
        ".size kvmfork_interrupt_entry, . - kvmfork_interrupt_entry\n");

static volatile sig_atomic_t interrupt_armed;
static volatile sig_atomic_t interrupt_requested;
static volatile unsigned long interrupt_count;

/* Called only from kvmfork_interrupt_entry, on whatever thread was running. */
__attribute__((visibility("hidden"), used)) void kvmfork_interrupt_handler(void);

void kvmfork_interrupt_handler(void)
{
    int saved_errno = errno;
    interrupt_count = interrupt_count + 1;
    if (interrupt_armed) {
        interrupt_requested = 1;
        /* A no-op if user code set SIGINT to SIG_IGN/SIG_DFL. */
        PyErr_SetInterruptEx(SIGINT);
    }
    errno = saved_errno;
}

void kvmfork_interrupt_publish(struct kvmfork_mailbox *mb)
{
    kvmfork_mb_write64(mb, KVMFORK_MB_INTERRUPT_ENTRY_OFF,
                       (uint64_t)(uintptr_t)kvmfork_interrupt_entry);
}

void kvmfork_interrupt_begin_request(void)
{
    interrupt_armed = 0;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    interrupt_requested = 0;
}

void kvmfork_interrupt_set_armed(bool armed)
{
    interrupt_armed = armed;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    /* Closing the gate: an interrupt that tripped SIGINT after the user's
     * last bytecode must not raise later, in the runner or the next
     * request. This clears only SIGINT's trip, without running handlers. */
    if (!armed && interrupt_requested)
        (void)PyOS_InterruptOccurred();
}

bool kvmfork_interrupt_requested(void)
{
    return interrupt_requested != 0;
}

unsigned long kvmfork_interrupt_count(void)
{
    return interrupt_count;
}
