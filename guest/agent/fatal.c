/* Console logging and the agent's terminal paths (fatal error, self-test end). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <unistd.h>

#include "agent.h"

static enum kvmfork_mode fatal_mode = KVMFORK_MODE_SERVE;
static struct kvmfork_mailbox *fatal_mailbox;

void kvmfork_fatal_setup(enum kvmfork_mode mode, struct kvmfork_mailbox *mb)
{
    fatal_mode = mode;
    fatal_mailbox = mb;
}

void kvmfork_log(const char *fmt, ...)
{
    char line[1024];
    va_list args;
    va_start(args, fmt);
    vsnprintf(line, sizeof line, fmt, args);
    va_end(args);
    fprintf(stderr, "[%9.3f] kvmfork-agent: %s\n", kvmfork_uptime_seconds(), line);
    fflush(stderr);
}

__attribute__((noreturn)) static void halt_forever(void)
{
    /* PID 1 exiting would panic the kernel; park instead. */
    for (;;)
        pause();
}

void kvmfork_selftest_finish(bool passed)
{
    printf("%s\n", passed ? "KVMFORK-SELFTEST-OK" : "KVMFORK-SELFTEST-FAIL");
    fflush(stdout);
    if (fatal_mode == KVMFORK_MODE_HOST_SELFTEST)
        exit(passed ? 0 : 1);
    sync();
    reboot(RB_POWER_OFF);
    halt_forever();
}

void kvmfork_fatal(const char *fmt, ...)
{
    char message[4096];
    va_list args;
    va_start(args, fmt);
    int len = vsnprintf(message, sizeof message, fmt, args);
    va_end(args);
    if (len < 0)
        len = 0;
    if ((size_t)len >= sizeof message)
        len = sizeof message - 1;

    kvmfork_log("FATAL: %s", message);
    if (fatal_mode != KVMFORK_MODE_SERVE)
        kvmfork_selftest_finish(false);

    struct kvmfork_mailbox *mb = fatal_mailbox;
    if (mb != NULL && mb->base != NULL) {
        memcpy(mb->base + KVMFORK_MB_STDERR_OFF, message, (size_t)len);
        kvmfork_mb_write32(mb, KVMFORK_MB_RESP_STDERR_LEN_OFF, (uint32_t)len);
        kvmfork_mb_write32(mb, KVMFORK_MB_RESP_STDOUT_LEN_OFF, 0);
        kvmfork_mb_write32(mb, KVMFORK_MB_RESP_STATUS_OFF, KVMFORK_STATUS_AGENT_ERROR);
        kvmfork_ring(mb, KVMFORK_DOORBELL_FATAL);
    }
    halt_forever();
}
