/* Self-test: built-in requests through the real request path, for running
 * the agent without kvmfork's VMM (QEMU probe, host chroot). The agent plays
 * the host's part by writing requests into the mailbox itself. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "agent.h"

#define SELFTEST_SEQ_BASE 0x7465737400000000ULL /* "test" */
#define NO_EXPECTATION (-1000)

struct selftest_case {
    const char *name;
    const char *code;
    uint32_t language;
    uint32_t code_len_override; /* 0: strlen(code) */
    uint32_t stdout_cap;
    uint32_t stderr_cap;
    uint32_t expect_status;
    int expect_exit;            /* NO_EXPECTATION to skip */
    const char *expect_stdout;  /* exact, NULL to skip */
    const char *expect_stderr_contains;
    uint32_t expect_flags;
    int32_t expect_stdout_len;  /* -1 to skip */
};

static const struct selftest_case cases[] = {
    {"print", "print(1+1)", KVMFORK_LANG_PYTHON, 0, 4096, 4096, KVMFORK_STATUS_OK, 0, "2\n", NULL, 0, -1},
    {"sum", "print(sum(range(10**6)))", KVMFORK_LANG_PYTHON, 0, 4096, 4096, KVMFORK_STATUS_OK, 0,
     "499999500000\n", NULL, 0, -1},
    {"numpy-mean", "import numpy as np\nprint(np.arange(10).mean())", KVMFORK_LANG_PYTHON, 0, 4096,
     4096, KVMFORK_STATUS_OK, 0, "4.5\n", NULL, 0, -1},
    {"exception", "x = 1\n1/0", KVMFORK_LANG_PYTHON, 0, 4096, 4096, KVMFORK_STATUS_OK, 1, "",
     "Traceback (most recent call last):\n  File \"<string>\", line 2, in <module>\n"
     "ZeroDivisionError: division by zero\n",
     0, -1},
    {"syntax-error", "print(", KVMFORK_LANG_PYTHON, 0, 4096, 4096, KVMFORK_STATUS_OK, 1, "",
     "SyntaxError", 0, -1},
    {"sys-exit", "import sys\nprint('bye')\nsys.exit(3)", KVMFORK_LANG_PYTHON, 0, 4096, 4096,
     KVMFORK_STATUS_OK, 3, "bye\n", NULL, 0, -1},
    {"stderr", "import sys\nprint('to err', file=sys.stderr)", KVMFORK_LANG_PYTHON, 0, 4096, 4096,
     KVMFORK_STATUS_OK, 0, "", "to err\n", 0, -1},
    {"big-output-truncated", "print('x' * 100000)", KVMFORK_LANG_PYTHON, 0, 1000, 4096,
     KVMFORK_STATUS_OK, 0, NULL, NULL, KVMFORK_RESP_FLAG_STDOUT_TRUNCATED, 1000},
    {"utf8-cut", "print('é' * 10)", KVMFORK_LANG_PYTHON, 0, 5, 4096, KVMFORK_STATUS_OK, 0, "éé",
     NULL, KVMFORK_RESP_FLAG_STDOUT_TRUNCATED, 4},
    {"bad-language", "console.log(1)", KVMFORK_LANG_NODE, 0, 4096, 4096, KVMFORK_STATUS_BAD_REQUEST,
     NO_EXPECTATION, "", "unsupported language", 0, -1},
    {"code-too-long", "print(1)", KVMFORK_LANG_PYTHON, KVMFORK_MB_CODE_MAX + 1, 4096, 4096,
     KVMFORK_STATUS_BAD_REQUEST, NO_EXPECTATION, "", "limit", 0, -1},
};

static void printable(char *dst, size_t dst_len, const uint8_t *src, size_t len)
{
    size_t o = 0;
    for (size_t i = 0; i < len && o + 5 < dst_len; i++) {
        uint8_t c = src[i];
        if (c >= 0x20 && c < 0x7f && c != '\\')
            dst[o++] = (char)c;
        else
            o += (size_t)snprintf(dst + o, dst_len - o, "\\x%02x", c);
    }
    dst[o < dst_len ? o : dst_len - 1] = '\0';
}

static bool contains(const uint8_t *hay, size_t hay_len, const char *needle)
{
    size_t n = strlen(needle);
    for (size_t i = 0; n <= hay_len && i <= hay_len - n; i++)
        if (memcmp(hay + i, needle, n) == 0)
            return true;
    return false;
}

/* Pages a request writes = pages a fork dirties = what the VMM copies back
 * on reset. Measured the way kvmfork forks, with copy-on-write: the request
 * runs in a fork()ed child, which then counts its pages that are no longer
 * shared with the parent (pagemap bit 56, "exclusively mapped"). Host
 * self-test only (a guest fork() would cost seconds of emulated kernel
 * work). Static buffers: the count must not allocate. */
#define PAGEMAP_PRESENT (1ULL << 63)
#define PAGEMAP_EXCLUSIVE (1ULL << 56)

static long exclusive_pages(void)
{
    static char maps[256 * 1024];
    static uint64_t entries[512];
    int maps_fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    int pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    long count = -1;
    size_t len = 0;
    ssize_t n;
    if (maps_fd < 0 || pagemap_fd < 0)
        goto out;
    while (len < sizeof maps - 1 && (n = read(maps_fd, maps + len, sizeof maps - 1 - len)) > 0)
        len += (size_t)n;
    maps[len] = '\0';
    count = 0;
    for (char *line = maps; line != NULL && *line != '\0';) {
        char *next = strchr(line, '\n');
        char *cursor;
        unsigned long start = strtoul(line, &cursor, 16);
        unsigned long end = strtoul(cursor + 1, NULL, 16);
        for (unsigned long page = start / 4096; page < end / 4096 && end < (1UL << 47);) {
            size_t want = end / 4096 - page < 512 ? end / 4096 - page : 512;
            n = pread(pagemap_fd, entries, want * 8, (off_t)(page * 8));
            if (n <= 0)
                break;
            for (ssize_t i = 0; i < n / 8; i++)
                count += (entries[i] & (PAGEMAP_PRESENT | PAGEMAP_EXCLUSIVE)) ==
                         (PAGEMAP_PRESENT | PAGEMAP_EXCLUSIVE);
            page += (unsigned long)n / 8;
        }
        line = next ? next + 1 : NULL;
    }
out:
    if (maps_fd >= 0)
        close(maps_fd);
    if (pagemap_fd >= 0)
        close(pagemap_fd);
    return count;
}

/* Runs the request (or nothing) in a child; returns its private pages. */
static long pages_dirtied_in_child(struct kvmfork_mailbox *mb, bool run_request)
{
    int fds[2];
    if (pipe(fds) != 0)
        return -1;
    pid_t child = fork();
    if (child == 0) {
        if (run_request)
            kvmfork_handle_request(mb);
        long count = exclusive_pages();
        ssize_t ignored = write(fds[1], &count, sizeof count);
        (void)ignored;
        _exit(0);
    }
    long count = -1;
    if (child > 0 && read(fds[0], &count, sizeof count) != sizeof count)
        count = -1;
    if (child > 0)
        waitpid(child, NULL, 0);
    close(fds[0]);
    close(fds[1]);
    return count;
}

/* Second pass, after every fault count is taken: fork() write-protects
 * the parent's pages, so its later requests would fault again. */
static void report_dirtied_pages(struct kvmfork_mailbox *mb, uint64_t seq)
{
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++, seq++) {
        const struct selftest_case *c = &cases[i];
        uint32_t code_len = c->code_len_override ? c->code_len_override
                                                 : (uint32_t)strlen(c->code);
        kvmfork_put_request(mb, seq, c->language, c->code, strlen(c->code), c->stdout_cap,
                          c->stderr_cap);
        kvmfork_mb_write32(mb, KVMFORK_MB_REQ_CODE_LEN_OFF, code_len);
        /* The child's own bookkeeping (stack, buffers) is the baseline. */
        long baseline = pages_dirtied_in_child(mb, false);
        long total = pages_dirtied_in_child(mb, true);
        if (baseline < 0 || total < 0) {
            kvmfork_log("selftest %-20s dirtied pages: unavailable (no /proc?)", c->name);
            return;
        }
        kvmfork_log("selftest %-20s dirtied %4ld pages (%ld KiB) outside the mailbox", c->name,
                  total - baseline, (total - baseline) * 4);
    }
}

/* Runs one request the way a fork would and reports it on the console. */
static void run_case(struct kvmfork_mailbox *mb, uint64_t seq, const char *name, uint32_t language,
                     const char *code, uint32_t code_len, uint32_t stdout_cap,
                     uint32_t stderr_cap)
{
    kvmfork_put_request(mb, seq, language, code, strlen(code), stdout_cap, stderr_cap);
    kvmfork_mb_write32(mb, KVMFORK_MB_REQ_CODE_LEN_OFF, code_len);
    long faults_before = kvmfork_minor_faults();
    double started = kvmfork_uptime_seconds();
    kvmfork_handle_request(mb);
    double wall_ms = (kvmfork_uptime_seconds() - started) * 1e3;
    long faults = kvmfork_minor_faults() - faults_before;
    char out[200];
    uint32_t out_len = kvmfork_mb_read32(mb, KVMFORK_MB_RESP_STDOUT_LEN_OFF);
    printable(out, sizeof out, mb->base + KVMFORK_MB_STDOUT_OFF, out_len < 40 ? out_len : 40);
    kvmfork_log("selftest %-20s wall %8.3f ms  exec %8.3f ms  page faults %3ld  "
              "status %u exit %d stdout %u bytes \"%s\"",
              name, wall_ms,
              (double)kvmfork_mb_read64(mb, KVMFORK_MB_RESP_EXEC_NS_OFF) / 1e6, faults,
              kvmfork_mb_read32(mb, KVMFORK_MB_RESP_STATUS_OFF),
              (int32_t)kvmfork_mb_read32(mb, KVMFORK_MB_RESP_EXIT_CODE_OFF), out_len, out);
}

static bool check_case(struct kvmfork_mailbox *mb, uint64_t seq, const struct selftest_case *c)
{
    const uint8_t *out = mb->base + KVMFORK_MB_STDOUT_OFF;
    const uint8_t *err = mb->base + KVMFORK_MB_STDERR_OFF;
    uint32_t out_len = kvmfork_mb_read32(mb, KVMFORK_MB_RESP_STDOUT_LEN_OFF);
    uint32_t err_len = kvmfork_mb_read32(mb, KVMFORK_MB_RESP_STDERR_LEN_OFF);
    uint32_t status = kvmfork_mb_read32(mb, KVMFORK_MB_RESP_STATUS_OFF);
    int32_t exit_code = (int32_t)kvmfork_mb_read32(mb, KVMFORK_MB_RESP_EXIT_CODE_OFF);
    uint32_t flags = kvmfork_mb_read32(mb, KVMFORK_MB_RESP_FLAGS_OFF);
    const char *problem = NULL;

    if (kvmfork_mb_read64(mb, KVMFORK_MB_RESP_SEQ_OFF) != seq)
        problem = "response seq does not echo the request";
    else if (kvmfork_mb_read32(mb, KVMFORK_MB_AGENT_STATE_OFF) != KVMFORK_STATE_DONE)
        problem = "agent state is not DONE";
    else if (status != c->expect_status)
        problem = "unexpected status";
    else if (c->expect_exit != NO_EXPECTATION && exit_code != c->expect_exit)
        problem = "unexpected exit code";
    else if (c->expect_stdout != NULL &&
             (out_len != strlen(c->expect_stdout) || memcmp(out, c->expect_stdout, out_len) != 0))
        problem = "unexpected stdout";
    else if (c->expect_stdout_len >= 0 && out_len != (uint32_t)c->expect_stdout_len)
        problem = "unexpected stdout length";
    else if (c->expect_stderr_contains != NULL && !contains(err, err_len, c->expect_stderr_contains))
        problem = "stderr lacks the expected text";
    else if (flags != c->expect_flags)
        problem = "unexpected flags";
    else if (out_len > c->stdout_cap || err_len > c->stderr_cap)
        problem = "output exceeds the request's cap";
    if (problem == NULL)
        return true;
    char err_text[600];
    printable(err_text, sizeof err_text, err, err_len < 300 ? err_len : 300);
    kvmfork_log("selftest %s FAILED: %s (flags %#x, stderr \"%s\")", c->name, problem, flags,
              err_text);
    return false;
}

/* Same fork seed -> same random streams; a different seed -> different. */
static bool check_reseeding(struct kvmfork_mailbox *mb, uint64_t seq)
{
    static const char code[] =
        "import random, numpy\nprint(random.random(), numpy.random.rand())";
    char outputs[3][128];
    static const uint8_t seed_bytes[3] = {0x11, 0x11, 0x22};
    for (int i = 0; i < 3; i++) {
        memset(mb->base + KVMFORK_MB_FORK_SEED_OFF, seed_bytes[i], KVMFORK_MB_SEED_LEN);
        run_case(mb, seq + (uint64_t)i, "fork-reseed", KVMFORK_LANG_PYTHON, code,
                 (uint32_t)strlen(code), 4096, 4096);
        uint32_t len = kvmfork_mb_read32(mb, KVMFORK_MB_RESP_STDOUT_LEN_OFF);
        if (kvmfork_mb_read32(mb, KVMFORK_MB_RESP_STATUS_OFF) != KVMFORK_STATUS_OK || len == 0 ||
            len >= sizeof outputs[i]) {
            kvmfork_log("selftest fork-reseed FAILED: request %d did not run", i);
            return false;
        }
        memcpy(outputs[i], mb->base + KVMFORK_MB_STDOUT_OFF, len);
        outputs[i][len] = '\0';
    }
    memset(mb->base + KVMFORK_MB_FORK_SEED_OFF, 0, KVMFORK_MB_SEED_LEN);
    if (strcmp(outputs[0], outputs[1]) != 0 || strcmp(outputs[0], outputs[2]) == 0) {
        kvmfork_log("selftest fork-reseed FAILED: outputs %s / %s / %s", outputs[0], outputs[1],
                  outputs[2]);
        return false;
    }
    return true;
}

bool kvmfork_selftest_run(struct kvmfork_mailbox *mb, bool measure_dirty)
{
    bool passed = true;
    uint64_t seq = SELFTEST_SEQ_BASE;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++, seq++) {
        const struct selftest_case *c = &cases[i];
        uint32_t code_len = c->code_len_override ? c->code_len_override
                                                 : (uint32_t)strlen(c->code);
        run_case(mb, seq, c->name, c->language, c->code, code_len, c->stdout_cap,
                 c->stderr_cap);
        passed &= check_case(mb, seq, c);
    }
    passed &= check_reseeding(mb, seq);
    if (measure_dirty)
        report_dirtied_pages(mb, seq + 3);
    return passed;
}
