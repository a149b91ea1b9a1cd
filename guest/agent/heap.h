/* The heap policy both agents (CPython's and Node's addon) share. On PVM
 * hosts a guest page fault on a never-touched page costs ~8 ms and a syscall
 * ~0.5 ms, so a fork must find the memory it grows into already mapped: all
 * malloc memory comes from one brk heap that is never trimmed, and a large
 * free part of it is populated, in transparent huge pages, before the
 * snapshot. Self-contained (no logging, no fatal): callers report. */
#ifndef KVMFORK_HEAP_H
#define KVMFORK_HEAP_H

#include <stdbool.h>
#include <stdint.h>

/* Guest RAM is 512 MiB; what is left after the reserve (~150 MiB with
 * CPython's template) holds the page cache, /tmp and the kernel. Node's
 * rootfs and V8 heap take ~210 MiB, so its reserve is smaller. */
#define KVMFORK_DEFAULT_HEAP_RESERVE_MIB 256
#define KVMFORK_NODE_HEAP_RESERVE_MIB 128

struct kvmfork_heap_report {
    bool huge_pages;        /* the reserve was populated in 2 MiB pages */
    double seconds;         /* populating the reserve and the stack */
    long page_faults;       /* minor + major faults that took */
    uint64_t anon_huge_mib; /* AnonHugePages afterwards */
    uint64_t free_mib;      /* MemFree afterwards */
};

/* mallopt: never mmap (fresh, unfaulted pages), never trim, one arena for
 * all threads (other arenas would be mmap'ed heaps). 0, or -1 if glibc
 * refused a setting. */
int kvmfork_heap_policy(void);

/* Populates a free heap reserve of reserve_bytes and 2 MiB of stack below
 * the caller. own_kernel: the process is the guest's PID 1, so it may set
 * the kernel's THP knobs (never on a host: the build-time self-tests run
 * the agents there). 0, or -errno with *failed naming the step. */
int kvmfork_heap_prefault(uint64_t reserve_bytes, bool own_kernel, struct kvmfork_heap_report *report,
                          const char **failed);

#endif
