/* Console logging and the agent's terminal paths (fatal error, self-test end). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/reboot.h>
#include <unistd.h>

#include "agent.h"

static enum forkd_mode fatal_mode = FORKD_MODE_SERVE;
static struct forkd_mailbox *fatal_mailbox;

void forkd_fatal_setup(enum forkd_mode mode, struct forkd_mailbox *mb)
{
    fatal_mode = mode;
    fatal_mailbox = mb;
}

void forkd_log(const char *fmt, ...)
{
    char line[1024];
    va_list args;
    va_start(args, fmt);
    vsnprintf(line, sizeof line, fmt, args);
    va_end(args);
    fprintf(stderr, "[%9.3f] forkd-agent: %s\n", forkd_uptime_seconds(), line);
    fflush(stderr);
}

__attribute__((noreturn)) static void halt_forever(void)
{
    /* PID 1 exiting would panic the kernel; park instead. */
    for (;;)
        pause();
}

void forkd_selftest_finish(bool passed)
{
    printf("%s\n", passed ? "FORKD-SELFTEST-OK" : "FORKD-SELFTEST-FAIL");
    fflush(stdout);
    if (fatal_mode == FORKD_MODE_HOST_SELFTEST)
        exit(passed ? 0 : 1);
    sync();
    reboot(RB_POWER_OFF);
    halt_forever();
}

void forkd_fatal(const char *fmt, ...)
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

    forkd_log("FATAL: %s", message);
    if (fatal_mode != FORKD_MODE_SERVE)
        forkd_selftest_finish(false);

    struct forkd_mailbox *mb = fatal_mailbox;
    if (mb != NULL && mb->base != NULL) {
        memcpy(mb->base + FORKD_MB_STDERR_OFF, message, (size_t)len);
        forkd_mb_write32(mb, FORKD_MB_RESP_STDERR_LEN_OFF, (uint32_t)len);
        forkd_mb_write32(mb, FORKD_MB_RESP_STDOUT_LEN_OFF, 0);
        forkd_mb_write32(mb, FORKD_MB_RESP_STATUS_OFF, FORKD_STATUS_AGENT_ERROR);
        forkd_ring(mb, FORKD_DOORBELL_FATAL);
    }
    halt_forever();
}
