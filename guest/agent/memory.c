/* Memory policy. On PVM hosts a guest page fault on a never-touched page
 * costs ~8 ms and a syscall ~0.5 ms, so a fork must find every page it
 * needs already mapped: all allocations come from one brk heap that is
 * never trimmed, and a generous part of it is populated before the
 * snapshot. */
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include "agent.h"

#ifndef MADV_HUGEPAGE
#define MADV_HUGEPAGE 14
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14 */
#endif

#define PAGE_SIZE_BYTES 4096UL
#define HUGE_PAGE_BYTES (2UL << 20)
#define THP_SYSFS "/sys/kernel/mm/transparent_hugepage/"
#define HEAP_TOP_PAD_BYTES (8UL << 20)  /* fewer brk calls while the template grows */
#define STACK_RESERVE_BYTES (2UL << 20) /* deep C recursion (repr, json, re) */

/* pymalloc arenas from malloc instead of mmap: freed arenas then go back to
 * the never-trimmed heap instead of munmap, and new ones reuse its pages. */
static void *arena_alloc(void *ctx, size_t size)
{
    (void)ctx;
    return malloc(size);
}

static void arena_free(void *ctx, void *ptr, size_t size)
{
    (void)ctx;
    (void)size;
    free(ptr);
}

void kvmfork_memory_configure(void)
{
    /* Never mmap (fresh, unfaulted pages), never trim, one arena for all
     * threads (other arenas would be mmap'ed heaps). */
    if (mallopt(M_MMAP_MAX, 0) != 1 || mallopt(M_TRIM_THRESHOLD, -1) != 1 ||
        mallopt(M_TOP_PAD, (int)HEAP_TOP_PAD_BYTES) != 1 || mallopt(M_ARENA_MAX, 1) != 1)
        kvmfork_fatal("mallopt refused the heap policy");
    PyObjectArenaAllocator arenas = {NULL, arena_alloc, arena_free};
    PyObject_SetArenaAllocator(&arenas);
}

/* Populate [lo, hi) with one syscall; fall back to touching each page. */
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

/* Writes `value` to a THP sysfs knob; false if the kernel has no THP. */
static bool thp_set(const char *knob, const char *value)
{
    char path[128];
    snprintf(path, sizeof path, THP_SYSFS "%s", knob);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return false;
    size_t n = strlen(value);
    bool ok = write(fd, value, n) == (ssize_t)n;
    close(fd);
    if (!ok)
        kvmfork_fatal("write %s to %s: %s", value, path, strerror(errno));
    return true;
}

/* Huge pages only where the agent asks (the heap reserve), never compaction
 * or reclaim to get one (emulated work inside some fork's exec: a fault
 * falls back to 4 KiB instead), and khugepaged asleep: it would wake every
 * 10 s of guest time, also inside forks, to scan a heap that is already
 * huge. False if the kernel was built without THP. */
static bool thp_configure(void)
{
    if (!thp_set("enabled", "madvise"))
        return false;
    thp_set("defrag", "never");
    thp_set("khugepaged/defrag", "0");
    thp_set("khugepaged/scan_sleep_millisecs", "4294967295");
    thp_set("khugepaged/alloc_sleep_millisecs", "4294967295");
    return true;
}

/* A 4 KiB page of the reserve costs ~10 ms of emulated kernel time at boot
 * on PVM hosts (measured: 34 MiB in 100 s) and a 2 MiB huge page about as
 * much as a few 4 KiB ones (it is one fault; clearing it is a rep stos), once
 * per template. The populated reserve is all zero pages: holes in the
 * snapshot's sparse memory file, so it costs no host memory until a fork
 * writes it, and then only the host's copy-on-write (~15 us a page here)
 * instead of a guest page fault. A fork that outgrows it pays a guest fault
 * per 4 KiB page. */
static void prefault_heap(uint64_t reserve_bytes)
{
    if (reserve_bytes == 0)
        return;
    bool huge = thp_configure();
    uint8_t *reserve = malloc(reserve_bytes);
    if (reserve == NULL)
        kvmfork_fatal("cannot allocate the %llu MiB heap reserve",
                    (unsigned long long)(reserve_bytes >> 20));
    /* The block and the top pad behind it end at the program break. */
    uintptr_t lo = (uintptr_t)reserve & ~(PAGE_SIZE_BYTES - 1);
    uintptr_t hi = (uintptr_t)sbrk(0);
    /* Splits the heap VMA at lo; the 2 MiB-aligned part of [lo, hi) then
     * faults in huge pages. Later brk growth is a new VMA without the flag:
     * 4 KiB pages, as before. */
    if (huge && madvise((void *)lo, hi - lo, MADV_HUGEPAGE) != 0)
        kvmfork_fatal("madvise(MADV_HUGEPAGE) on the heap reserve: %s", strerror(errno));
    if (!huge)
        kvmfork_log("warning: kernel without transparent huge pages; "
                  "populating the heap reserve 4 KiB at a time");
    populate(lo, hi);
    free(reserve); /* back to the top chunk; M_TRIM_THRESHOLD keeps it mapped */
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
static unsigned long long meminfo_kib(const char *field)
{
    FILE *f = fopen("/proc/meminfo", "re");
    if (f == NULL)
        return 0;
    char line[128];
    unsigned long long kib = 0;
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

void kvmfork_memory_prefault(uint64_t heap_reserve_bytes)
{
    double started = kvmfork_uptime_seconds();
    long faults_before = kvmfork_minor_faults();
    prefault_heap(heap_reserve_bytes);
    prefault_stack();
    kvmfork_log("pre-faulted %llu MiB heap + %lu MiB stack in %.3f s (%ld page faults, "
              "%llu MiB in huge pages, %llu MiB free)",
              (unsigned long long)(heap_reserve_bytes >> 20), STACK_RESERVE_BYTES >> 20,
              kvmfork_uptime_seconds() - started, kvmfork_minor_faults() - faults_before,
              meminfo_kib("AnonHugePages:") >> 10, meminfo_kib("MemFree:") >> 10);
}

long kvmfork_minor_faults(void)
{
    struct rusage usage;
    if (getrusage(RUSAGE_SELF, &usage) != 0)
        return -1;
    return usage.ru_minflt + usage.ru_majflt;
}
