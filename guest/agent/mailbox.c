/* Mapping the mailbox and doorbell (see ../contract.h for the protocol). */
#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "agent.h"

int kvmfork_mailbox_map_devmem(struct kvmfork_mailbox *mb, uint64_t mailbox_gpa)
{
    /* O_SYNC: the host reads this memory behind the guest's caches. */
    int fd = open("/dev/mem", O_RDWR | O_SYNC | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    /* MAP_SHARED so stores reach the physical pages the VMM reads. The
     * kernel fills the page tables at mmap time (remap_pfn_range), so the
     * hot path never faults on these pages. */
    void *base = mmap(NULL, KVMFORK_MAILBOX_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                      (off_t)mailbox_gpa);
    if (base == MAP_FAILED) {
        int err = errno;
        close(fd);
        return -err;
    }
    void *doorbell = mmap(NULL, KVMFORK_DOORBELL_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                          (off_t)KVMFORK_DOORBELL_GPA);
    if (doorbell == MAP_FAILED) {
        int err = errno;
        munmap(base, KVMFORK_MAILBOX_SIZE);
        close(fd);
        return -err;
    }
    close(fd);
    mb->base = base;
    mb->doorbell = doorbell;
    return 0;
}

int kvmfork_mailbox_map_anonymous(struct kvmfork_mailbox *mb)
{
    /* Shared, like the real mailbox: the self-test runs requests in fork()ed
     * children and reads their responses. */
    void *base = mmap(NULL, KVMFORK_MAILBOX_SIZE, PROT_READ | PROT_WRITE,
                      MAP_SHARED | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (base == MAP_FAILED)
        return -errno;
    mb->base = base;
    mb->doorbell = NULL;
    return 0;
}
