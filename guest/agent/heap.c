/* See heap.h. */
#include "heap.h"

#include <alloca.h>
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_HUGEPAGE
#define MADV_HUGEPAGE 14
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14 */
#endif

#define PAGE_SIZE_BYTES 4096UL
#define HEAP_TOP_PAD_BYTES (8UL << 20)  /* fewer brk calls while the template grows */
#define STACK_RESERVE_BYTES (2UL << 20) /* deep recursion (repr, json, re, V8) */
#define THP_SYSFS "/sys/kernel/mm/transparent_hugepage/"

int kvmfork_heap_policy(void)
{
    if (mallopt(M_MMAP_MAX, 0) != 1 || mallopt(M_TRIM_THRESHOLD, -1) != 1 ||
        mallopt(M_TOP_PAD, (int)HEAP_TOP_PAD_BYTES) != 1 || mallopt(M_ARENA_MAX, 1) != 1)
        return -1;
    return 0;
}

/* Writes `value` to a THP sysfs knob: 1 done, 0 the kernel has no THP,
 * -errno a failed write. */
static int thp_set(const char *knob, const char *value)
{
    char path[128];
    snprintf(path, sizeof path, THP_SYSFS "%s", knob);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? 0 : -errno;
    size_t n = strlen(value);
    int rc = write(fd, value, n) == (ssize_t)n ? 1 : -errno;
    close(fd);
    return rc;
}

/* Huge pages only where asked (the heap reserve), never compaction or
 * reclaim to get one (emulated work inside some fork's exec: a fault falls
 * back to 4 KiB instead), and khugepaged asleep: it would wake every 10 s
 * of guest time, also inside forks, to scan a heap that is already huge. */
static int thp_configure(const char **failed)
{
    static const char *const knobs[][2] = {
        {"enabled", "madvise"},
        {"defrag", "never"},
        {"khugepaged/defrag", "0"},
        {"khugepaged/scan_sleep_millisecs", "4294967295"},
        {"khugepaged/alloc_sleep_millisecs", "4294967295"},
    };
    for (size_t i = 0; i < sizeof knobs / sizeof knobs[0]; i++) {
        int rc = thp_set(knobs[i][0], knobs[i][1]);
        if (rc <= 0) {
            *failed = knobs[i][0];
            return rc;
        }
    }
    return 1;
}

/* Populates [lo, hi) with one syscall; falls back to touching each page. */
static void populate(uintptr_t lo, uintptr_t hi)
{
    lo &= ~(PAGE_SIZE_BYTES - 1);
    if (hi <= lo)
        return;
    if (madvise((void *)lo, hi - lo, MADV_POPULATE_WRITE) == 0)
        return;
    for (uintptr_t page = lo; page < hi; page += PAGE_SIZE_BYTES) {
        volatile uint8_t *p = (volatile uint8_t *)page;
        *p = *p; /* a write fault makes the page private and present */
    }
}

/* A 4 KiB page costs ~10 ms of emulated kernel time at boot on PVM hosts
 * (measured: 34 MiB in 100 s) and a 2 MiB huge page about as much as 50 of
 * them (one fault; clearing it is a rep stos): 256 MiB took 80 s. The
 * reserve is zero pages, holes in the snapshot's sparse memory file, so it
 * costs no host memory until a fork writes it, and then only the host's
 * copy-on-write (~15 us a page here) instead of a guest page fault. */
static int prefault_heap(uint64_t reserve_bytes, bool huge, const char **failed)
{
    if (reserve_bytes == 0)
        return 0;
    uint8_t *reserve = malloc(reserve_bytes);
    if (reserve == NULL) {
        *failed = "malloc of the reserve";
        return -ENOMEM;
    }
    /* The block and the top pad behind it end at the program break. */
    uintptr_t lo = (uintptr_t)reserve & ~(PAGE_SIZE_BYTES - 1);
    uintptr_t hi = (uintptr_t)sbrk(0);
    /* Splits the heap VMA at lo; the 2 MiB-aligned part of [lo, hi) then
     * faults in huge pages. Later brk growth is a new VMA without the flag:
     * 4 KiB pages, as before. */
    if (huge && madvise((void *)lo, hi - lo, MADV_HUGEPAGE) != 0) {
        *failed = "madvise(MADV_HUGEPAGE) on the reserve";
        free(reserve);
        return -errno;
    }
    populate(lo, hi);
    free(reserve); /* back to the top chunk; M_TRIM_THRESHOLD keeps it mapped */
    return 0;
}

__attribute__((noinline)) static void prefault_stack(void)
{
    uint8_t *low = alloca(STACK_RESERVE_BYTES);
    /* Touching the lowest byte first grows the stack VMA down to it in one
     * fault; populating the range in between is then a single madvise. */
    *(volatile uint8_t *)low = 0;
    populate((uintptr_t)low, (uintptr_t)__builtin_frame_address(0));
}

/* A /proc/meminfo field in KiB, or 0 if absent. */
static uint64_t meminfo_kib(const char *field)
{
    FILE *f = fopen("/proc/meminfo", "re");
    if (f == NULL)
        return 0;
    char line[128];
    uint64_t kib = 0;
    size_t n = strlen(field);
    while (fgets(line, sizeof line, f) != NULL) {
        if (strncmp(line, field, n) == 0) {
            kib = strtoull(line + n, NULL, 10);
            break;
        }
    }
    fclose(f);
    return kib;
}

static long page_faults(void)
{
    struct rusage usage;
    if (getrusage(RUSAGE_SELF, &usage) != 0)
        return -1;
    return usage.ru_minflt + usage.ru_majflt;
}

static double monotonic_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int kvmfork_heap_prefault(uint64_t reserve_bytes, bool own_kernel, struct kvmfork_heap_report *report,
                          const char **failed)
{
    double started = monotonic_seconds();
    long faults_before = page_faults();
    memset(report, 0, sizeof *report);
    if (own_kernel) {
        int rc = thp_configure(failed);
        if (rc < 0)
            return rc;
        report->huge_pages = rc == 1; /* 0: a kernel without THP */
    }
    int rc = prefault_heap(reserve_bytes, report->huge_pages, failed);
    if (rc != 0)
        return rc;
    prefault_stack();
    report->seconds = monotonic_seconds() - started;
    report->page_faults = page_faults() - faults_before;
    report->anon_huge_mib = meminfo_kib("AnonHugePages:") >> 10;
    report->free_mib = meminfo_kib("MemFree:") >> 10;
    return 0;
}
