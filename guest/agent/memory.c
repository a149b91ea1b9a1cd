/* Memory policy. On PVM hosts a guest page fault on a never-touched page
 * costs ~8 ms and a syscall ~0.5 ms, so a fork must find every page it
 * needs already mapped: all allocations come from one brk heap that is
 * never trimmed, and a generous part of it is populated before the
 * snapshot. */
#include <Python.h>

#include <errno.h>
#include <malloc.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include "agent.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* Linux 5.14 */
#endif

#define PAGE_SIZE_BYTES 4096UL
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

/* Every page of the reserve costs ~10 ms of emulated kernel time at boot on
 * PVM hosts (measured: 34 MiB in 100 s), once per template; a fork that
 * outgrows it pays ~8 ms per page instead. */
static void prefault_heap(uint64_t reserve_bytes)
{
    if (reserve_bytes == 0)
        return;
    uint8_t *reserve = malloc(reserve_bytes);
    if (reserve == NULL)
        kvmfork_fatal("cannot allocate the %llu MiB heap reserve",
                    (unsigned long long)(reserve_bytes >> 20));
    /* The block and the top pad behind it end at the program break. */
    populate((uintptr_t)reserve, (uintptr_t)sbrk(0));
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

void kvmfork_memory_prefault(uint64_t heap_reserve_bytes)
{
    double started = kvmfork_uptime_seconds();
    long faults_before = kvmfork_minor_faults();
    prefault_heap(heap_reserve_bytes);
    prefault_stack();
    kvmfork_log("pre-faulted %llu MiB heap + %lu MiB stack in %.3f s (%ld page faults)",
              (unsigned long long)(heap_reserve_bytes >> 20), STACK_RESERVE_BYTES >> 20,
              kvmfork_uptime_seconds() - started, kvmfork_minor_faults() - faults_before);
}

long kvmfork_minor_faults(void)
{
    struct rusage usage;
    if (getrusage(RUSAGE_SELF, &usage) != 0)
        return -1;
    return usage.ru_minflt + usage.ru_majflt;
}
