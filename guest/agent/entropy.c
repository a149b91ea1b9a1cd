/* Boot entropy: the kernel CRNG never initialises on its own on PVM hosts
 * (no RDRAND, no devices) and CPython aborts without it, so the host hands
 * the agent a seed in the mailbox. */
#include <errno.h>
#include <fcntl.h>
#include <linux/random.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "agent.h"

/* struct rand_pool_info with its flexible buffer sized for our seed. */
struct seed_pool {
    int entropy_count; /* bits credited */
    int buf_size;      /* bytes */
    uint32_t buf[KVMFORK_MB_SEED_LEN / 4];
};

static bool all_zero(const uint8_t *bytes, size_t len)
{
    uint8_t acc = 0;
    for (size_t i = 0; i < len; i++)
        acc |= bytes[i];
    return acc == 0;
}

void kvmfork_seed_kernel_rng(struct kvmfork_mailbox *mb, bool allow_missing_seed)
{
    struct seed_pool pool = {
        .entropy_count = KVMFORK_MB_SEED_LEN * 8,
        .buf_size = KVMFORK_MB_SEED_LEN,
    };
    memcpy(pool.buf, mb->base + KVMFORK_MB_BOOT_SEED_OFF, KVMFORK_MB_SEED_LEN);

    if (all_zero((const uint8_t *)pool.buf, sizeof pool.buf)) {
        if (!allow_missing_seed)
            kvmfork_fatal("the host wrote no boot seed at mailbox offset %#x",
                        KVMFORK_MB_BOOT_SEED_OFF);
        /* Self-test under QEMU only: nobody writes the seed there. TSC
         * jitter is weak entropy, acceptable for a development probe. */
        kvmfork_log("warning: no boot seed in the mailbox; self-test uses TSC jitter");
        for (size_t i = 0; i < KVMFORK_MB_SEED_LEN / 4; i++) {
            uint64_t t = kvmfork_rdtsc();
            pool.buf[i] = (uint32_t)(t ^ (t >> 29) ^ (i * 0x9e3779b9u));
        }
    }

    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        kvmfork_fatal("open /dev/urandom: %s", strerror(errno));
    if (ioctl(fd, RNDADDENTROPY, &pool) != 0)
        kvmfork_fatal("RNDADDENTROPY: %s", strerror(errno));
    close(fd);
    /* The seed must not stay readable to user code in the template. */
    memset(mb->base + KVMFORK_MB_BOOT_SEED_OFF, 0, KVMFORK_MB_SEED_LEN);
    memset(&pool, 0, sizeof pool);
}
