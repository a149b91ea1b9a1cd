/*
 * kvmfork guest agent: declarations shared by its modules.
 *
 * The agent is PID 1 of the template VM. It boots CPython + numpy, warms
 * them, rings the READY doorbell (the VMM snapshots there) and then serves
 * requests from the mailbox defined in ../contract.h, one per fork.
 */
#ifndef KVMFORK_AGENT_H
#define KVMFORK_AGENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "contract.h"
#include "heap.h"

/* ---- mailbox.c: the shared page area and the doorbell ---- */

struct kvmfork_mailbox {
    uint8_t *base;               /* KVMFORK_MAILBOX_SIZE bytes */
    volatile uint32_t *doorbell; /* NULL when there is no VMM (host self-test) */
};

/* Maps the mailbox and doorbell from /dev/mem. Returns 0 or -errno. */
int kvmfork_mailbox_map_devmem(struct kvmfork_mailbox *mb, uint64_t mailbox_gpa);
/* Private anonymous mailbox without doorbell, for the host self-test. */
int kvmfork_mailbox_map_anonymous(struct kvmfork_mailbox *mb);

static inline uint32_t kvmfork_mb_read32(const struct kvmfork_mailbox *mb, size_t off)
{
    return *(volatile const uint32_t *)(mb->base + off);
}

static inline uint64_t kvmfork_mb_read64(const struct kvmfork_mailbox *mb, size_t off)
{
    return *(volatile const uint64_t *)(mb->base + off);
}

static inline void kvmfork_mb_write32(struct kvmfork_mailbox *mb, size_t off, uint32_t value)
{
    *(volatile uint32_t *)(mb->base + off) = value;
}

static inline void kvmfork_mb_write64(struct kvmfork_mailbox *mb, size_t off, uint64_t value)
{
    *(volatile uint64_t *)(mb->base + off) = value;
}

/* One aligned 32-bit user-mode store: exits to the VMM without a syscall. */
static inline void kvmfork_ring(struct kvmfork_mailbox *mb, uint32_t value)
{
    /* Every mailbox write must be emitted before the VMM sees the ring. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (mb->doorbell != NULL)
        *mb->doorbell = value;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* ---- clock.c: rdtsc-based exec timing (no syscall on the hot path) ---- */

static inline uint64_t kvmfork_rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

/* Wall-clock seconds since boot (a syscall: boot/self-test only). */
double kvmfork_uptime_seconds(void);
/* Start and end a TSC frequency calibration spanning the warm-up. */
void kvmfork_tsc_calibration_begin(void);
void kvmfork_tsc_calibration_end(void);
/* TSC ticks -> nanoseconds; 0 before calibration. */
uint64_t kvmfork_tsc_to_ns(uint64_t ticks);

/* ---- fatal.c: the agent's only way out ---- */

enum kvmfork_mode {
    KVMFORK_MODE_SERVE,         /* PID 1 under the kvmfork VMM */
    KVMFORK_MODE_GUEST_SELFTEST,/* PID 1 with kvmfork.selftest=1 (QEMU probe) */
    KVMFORK_MODE_HOST_SELFTEST, /* `init --selftest` in a chroot, for development and CI */
};

void kvmfork_fatal_setup(enum kvmfork_mode mode, struct kvmfork_mailbox *mb);
/* Reports the error on the console and in the mailbox, rings FATAL and
 * never returns (PID 1 must not exit). */
__attribute__((noreturn, format(printf, 1, 2))) void kvmfork_fatal(const char *fmt, ...);
/* Self-test end: prints the marker, then powers off (PID 1) or exits. */
__attribute__((noreturn)) void kvmfork_selftest_finish(bool passed);

/* ---- init.c: PID 1 duties ---- */

struct kvmfork_boot_options {
    bool selftest;
    uint64_t mailbox_gpa;
    uint64_t heap_reserve_bytes; /* kvmfork.heap_reserve_mib= */
    bool heap_reserve_set;       /* given on the command line */
};


/* Mounts, console, environment. Failures are fatal. */
void kvmfork_init_system(void);
/* Reads kvmfork.* options from /proc/cmdline. */
void kvmfork_read_boot_options(struct kvmfork_boot_options *options);

/* ---- entropy.c ---- */

/* Credits the host's boot seed to the kernel CRNG (RNDADDENTROPY). */
void kvmfork_seed_kernel_rng(struct kvmfork_mailbox *mb, bool allow_missing_seed);

/* ---- memory.c: keep the hot path free of page faults and syscalls ---- */

/* mallopt + CPython arena allocator; before the interpreter starts. */
void kvmfork_memory_configure(void);
/* Pre-fault a free heap reserve of heap_reserve_bytes and the stack; right
 * before the snapshot. */
void kvmfork_memory_prefault(uint64_t heap_reserve_bytes, bool own_kernel);
/* Minor page faults so far (getrusage: a syscall, self-test only). */
long kvmfork_minor_faults(void);

/* ---- python_host.c: the interpreter and the request path ---- */

/* Starts CPython, loads the runner, imports the template's modules. */
void kvmfork_python_start(void);
/* Runs the runner's WARMUP snippets through kvmfork_handle_request and
 * checks every result. */
void kvmfork_python_warm_up(struct kvmfork_mailbox *mb);
/* gc.freeze() and friends; the last Python work before the snapshot. */
void kvmfork_python_prepare_template(void);
/* THE hot path: reads the request, runs it, writes the response. */
void kvmfork_handle_request(struct kvmfork_mailbox *mb);
/* Writes a request into the mailbox as the VMM would (warm-up, self-test). */
void kvmfork_put_request(struct kvmfork_mailbox *mb, uint64_t seq, uint32_t language,
                       uint32_t flags, const char *code, size_t code_len,
                       uint32_t stdout_cap, uint32_t stderr_cap);

/* ---- interrupt.c: the host's interrupt of a session exec ---- */

/* The user-mode entry the VMM jumps to (see interrupt.c for the frame). */
void kvmfork_interrupt_entry(void);
/* Writes the entry's address to KVMFORK_MB_INTERRUPT_ENTRY_OFF (boot). */
void kvmfork_interrupt_publish(struct kvmfork_mailbox *mb);
/* Closes the gate and forgets the previous request's interrupt. */
void kvmfork_interrupt_begin_request(void);
/* Opens (user code runs) or closes the gate; closing drops a pending
 * SIGINT trip that user code no longer saw. Needs the GIL. */
void kvmfork_interrupt_set_armed(bool armed);
/* Whether an interrupt hit an open gate since kvmfork_interrupt_begin_request. */
bool kvmfork_interrupt_requested(void);
/* Entries so far, gate open or not (self-test). */
unsigned long kvmfork_interrupt_count(void);

/* ---- selftest.c ---- */

/* Built-in requests through the request path; returns true when all pass.
 * measure_dirty: also count the pages each request dirties (fork-based). */
bool kvmfork_selftest_run(struct kvmfork_mailbox *mb, bool measure_dirty);

/* ---- log helpers ---- */

/* Console log line (stderr), prefixed with the guest uptime. */
__attribute__((format(printf, 1, 2))) void kvmfork_log(const char *fmt, ...);

#endif /* KVMFORK_AGENT_H */
