/* CPython's side of the heap policy (heap.h): pymalloc's arenas come from
 * the never-trimmed malloc heap, and the reserve is populated before the
 * snapshot. */
#include <Python.h>

#include <string.h>
#include <sys/resource.h>

#include "agent.h"
#include "heap.h"

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
    if (kvmfork_heap_policy() != 0)
        kvmfork_fatal("mallopt refused the heap policy");
    PyObjectArenaAllocator arenas = {NULL, arena_alloc, arena_free};
    PyObject_SetArenaAllocator(&arenas);
}

void kvmfork_memory_prefault(uint64_t heap_reserve_bytes, bool own_kernel)
{
    struct kvmfork_heap_report r;
    const char *failed = "";
    int rc = kvmfork_heap_prefault(heap_reserve_bytes, own_kernel, &r, &failed);
    if (rc != 0)
        kvmfork_fatal("pre-faulting the heap reserve: %s: %s", failed, strerror(-rc));
    if (own_kernel && !r.huge_pages)
        kvmfork_log("warning: kernel without transparent huge pages; "
                  "the heap reserve was populated 4 KiB at a time");
    kvmfork_log("pre-faulted %llu MiB heap + 2 MiB stack in %.3f s (%ld page faults, "
              "%llu MiB in huge pages, %llu MiB free)",
              (unsigned long long)(heap_reserve_bytes >> 20), r.seconds, r.page_faults,
              (unsigned long long)r.anon_huge_mib, (unsigned long long)r.free_mib);
}

long kvmfork_minor_faults(void)
{
    struct rusage usage;
    if (getrusage(RUSAGE_SELF, &usage) != 0)
        return -1;
    return usage.ru_minflt + usage.ru_majflt;
}
