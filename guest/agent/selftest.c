/* Self-test: built-in requests through the real request path, for running
 * the agent without kvmfork's VMM (QEMU probe, host chroot). The agent plays
 * the host's part by writing requests into the mailbox itself. */
#define _GNU_SOURCE /* REG_RIP, REG_RSP */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <ucontext.h>
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
    uint32_t flags;             /* KVMFORK_REQ_FLAG_* */
    const char *expect_result;  /* exact; NULL: RESP_RESULT_LEN 0 unless expect_result_len */
    uint32_t expect_result_len; /* with expect_result NULL: this length (truncation case) */
};

#define SESSION KVMFORK_REQ_FLAG_SESSION
#define RESEED KVMFORK_REQ_FLAG_RESEED
#define HAS_RESULT KVMFORK_RESP_FLAG_HAS_RESULT

static const struct selftest_case cases[] = {
    {"print", "print(1+1)", KVMFORK_LANG_PYTHON, 0, 4096, 4096, KVMFORK_STATUS_OK, 0, "2\n", NULL, 0, -1, RESEED, NULL, 0},
    {"sum", "print(sum(range(10**6)))", KVMFORK_LANG_PYTHON, 0, 4096, 4096, KVMFORK_STATUS_OK, 0,
     "499999500000\n", NULL, 0, -1, RESEED, NULL, 0},
    {"numpy-mean", "import numpy as np\nprint(np.arange(10).mean())", KVMFORK_LANG_PYTHON, 0, 4096,
     4096, KVMFORK_STATUS_OK, 0, "4.5\n", NULL, 0, -1, RESEED, NULL, 0},
    {"exception", "x = 1\n1/0", KVMFORK_LANG_PYTHON, 0, 4096, 4096, KVMFORK_STATUS_OK, 1, "",
     "Traceback (most recent call last):\n  File \"<string>\", line 2, in <module>\n"
     "ZeroDivisionError: division by zero\n",
     0, -1, RESEED, NULL, 0},
    {"syntax-error", "print(", KVMFORK_LANG_PYTHON, 0, 4096, 4096, KVMFORK_STATUS_OK, 1, "",
     "SyntaxError", 0, -1, RESEED, NULL, 0},
    {"sys-exit", "import sys\nprint('bye')\nsys.exit(3)", KVMFORK_LANG_PYTHON, 0, 4096, 4096,
     KVMFORK_STATUS_OK, 3, "bye\n", NULL, 0, -1, RESEED, NULL, 0},
    {"stderr", "import sys\nprint('to err', file=sys.stderr)", KVMFORK_LANG_PYTHON, 0, 4096, 4096,
     KVMFORK_STATUS_OK, 0, "", "to err\n", 0, -1, RESEED, NULL, 0},
    {"big-output-truncated", "print('x' * 100000)", KVMFORK_LANG_PYTHON, 0, 1000, 4096,
     KVMFORK_STATUS_OK, 0, NULL, NULL, KVMFORK_RESP_FLAG_STDOUT_TRUNCATED, 1000, RESEED, NULL, 0},
    {"utf8-cut", "print('é' * 10)", KVMFORK_LANG_PYTHON, 0, 5, 4096, KVMFORK_STATUS_OK, 0, "éé",
     NULL, KVMFORK_RESP_FLAG_STDOUT_TRUNCATED, 4, RESEED, NULL, 0},
    {"bad-language", "console.log(1)", KVMFORK_LANG_NODE, 0, 4096, 4096, KVMFORK_STATUS_BAD_REQUEST,
     NO_EXPECTATION, "", "unsupported language", 0, -1, RESEED, NULL, 0},
    {"code-too-long", "print(1)", KVMFORK_LANG_PYTHON, KVMFORK_MB_CODE_MAX + 1, 4096, 4096,
     KVMFORK_STATUS_BAD_REQUEST, NO_EXPECTATION, "", "limit", 0, -1, RESEED, NULL, 0},
    {.name = "bad-flags", .code = "print(1)", .language = KVMFORK_LANG_PYTHON, .flags = 0x80,
     .stdout_cap = 4096, .stderr_cap = 4096, .expect_status = KVMFORK_STATUS_BAD_REQUEST,
     .expect_exit = NO_EXPECTATION, .expect_stdout = "",
     .expect_stderr_contains = "unknown request flags 0x80", .expect_stdout_len = -1},
    /* Session mode, in order: the namespace persists from case to case. */
    {.name = "session-assign", .code = "x = 41", .language = KVMFORK_LANG_PYTHON,
     .flags = SESSION | RESEED, .stdout_cap = 4096, .stderr_cap = 4096,
     .expect_status = KVMFORK_STATUS_OK, .expect_exit = 0, .expect_stdout = "",
     .expect_stdout_len = -1},
    {.name = "session-expression", .code = "x += 1\nprint('x is', x)\nx", .language = KVMFORK_LANG_PYTHON,
     .flags = SESSION, .stdout_cap = 4096, .stderr_cap = 4096, .expect_status = KVMFORK_STATUS_OK,
     .expect_exit = 0, .expect_stdout = "x is 42\n", .expect_flags = HAS_RESULT,
     .expect_stdout_len = -1, .expect_result = "42"},
    {.name = "session-error", .code = "y = x * 2\nundefined_name", .language = KVMFORK_LANG_PYTHON,
     .flags = SESSION, .stdout_cap = 4096, .stderr_cap = 4096, .expect_status = KVMFORK_STATUS_OK,
     .expect_exit = 1, .expect_stdout = "",
     .expect_stderr_contains = "  File \"<string>\", line 2, in <module>\nNameError: name "
                               "'undefined_name' is not defined\n",
     .expect_stdout_len = -1},
    {.name = "session-kept", .code = "y, _", .language = KVMFORK_LANG_PYTHON, .flags = SESSION,
     .stdout_cap = 4096, .stderr_cap = 4096, .expect_status = KVMFORK_STATUS_OK, .expect_exit = 0,
     .expect_stdout = "", .expect_flags = HAS_RESULT, .expect_stdout_len = -1,
     .expect_result = "(84, 42)"},
    {.name = "session-exit", .code = "import sys\nz = 1\nsys.exit(7)", .language = KVMFORK_LANG_PYTHON,
     .flags = SESSION, .stdout_cap = 4096, .stderr_cap = 4096, .expect_status = KVMFORK_STATUS_OK,
     .expect_exit = 7, .expect_stdout = "", .expect_stdout_len = -1},
    {.name = "session-none", .code = "print(z)\nNone", .language = KVMFORK_LANG_PYTHON,
     .flags = SESSION, .stdout_cap = 4096, .stderr_cap = 4096, .expect_status = KVMFORK_STATUS_OK,
     .expect_exit = 0, .expect_stdout = "1\n", .expect_stdout_len = -1},
    /* repr is 400002 bytes: cut at 256 KiB, on a character boundary. */
    {.name = "session-result-cut", .code = "'\xc3\xa9' * 200000", .language = KVMFORK_LANG_PYTHON,
     .flags = SESSION, .stdout_cap = 4096, .stderr_cap = 4096, .expect_status = KVMFORK_STATUS_OK,
     .expect_exit = 0, .expect_stdout = "",
     .expect_flags = HAS_RESULT | KVMFORK_RESP_FLAG_RESULT_TRUNCATED, .expect_stdout_len = -1,
     .expect_result_len = KVMFORK_MB_RESULT_MAX - 1},
    {.name = "stateless-apart", .code = "print('x' in globals())\nx = 0\nx",
     .language = KVMFORK_LANG_PYTHON, .flags = RESEED, .stdout_cap = 4096, .stderr_cap = 4096,
     .expect_status = KVMFORK_STATUS_OK, .expect_exit = 0, .expect_stdout = "False\n",
     .expect_stdout_len = -1},
    {.name = "session-after-stateless", .code = "x", .language = KVMFORK_LANG_PYTHON,
     .flags = SESSION, .stdout_cap = 4096, .stderr_cap = 4096, .expect_status = KVMFORK_STATUS_OK,
     .expect_exit = 0, .expect_stdout = "", .expect_flags = HAS_RESULT, .expect_stdout_len = -1,
     .expect_result = "42"},
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
        kvmfork_put_request(mb, seq, c->language, c->flags, c->code, strlen(c->code),
                          c->stdout_cap, c->stderr_cap);
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
                     uint32_t flags, const char *code, uint32_t code_len, uint32_t stdout_cap,
                     uint32_t stderr_cap)
{
    kvmfork_put_request(mb, seq, language, flags, code, strlen(code), stdout_cap, stderr_cap);
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
    uint32_t result_len = kvmfork_mb_read32(mb, KVMFORK_MB_RESP_RESULT_LEN_OFF);
    const uint8_t *result = mb->base + KVMFORK_MB_RESULT_OFF;
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
    else if (c->expect_result != NULL ? result_len != strlen(c->expect_result) ||
                                            memcmp(result, c->expect_result, result_len) != 0
                                      : result_len != c->expect_result_len)
        problem = "unexpected result";
    if (problem == NULL)
        return true;
    char err_text[600];
    printable(err_text, sizeof err_text, err, err_len < 300 ? err_len : 300);
    kvmfork_log("selftest %s FAILED: %s (flags %#x, stderr \"%s\")", c->name, problem, flags,
              err_text);
    return false;
}

/* Same fork seed -> same random streams; a different seed -> different.
 * The last run is stateless without RESEED: reseeded all the same. */
static bool check_reseeding(struct kvmfork_mailbox *mb, uint64_t seq)
{
    static const char code[] =
        "import random, numpy\nprint(random.random(), numpy.random.rand())";
    char outputs[4][128];
    static const uint8_t seed_bytes[4] = {0x11, 0x11, 0x22, 0x11};
    static const uint32_t flags[4] = {RESEED, RESEED, RESEED, 0};
    for (int i = 0; i < 4; i++) {
        memset(mb->base + KVMFORK_MB_FORK_SEED_OFF, seed_bytes[i], KVMFORK_MB_SEED_LEN);
        run_case(mb, seq + (uint64_t)i, "fork-reseed", KVMFORK_LANG_PYTHON, flags[i], code,
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
    if (strcmp(outputs[0], outputs[1]) != 0 || strcmp(outputs[0], outputs[2]) == 0 ||
        strcmp(outputs[0], outputs[3]) != 0) {
        kvmfork_log("selftest fork-reseed FAILED: outputs %s / %s / %s / %s", outputs[0],
                  outputs[1], outputs[2], outputs[3]);
        return false;
    }
    return true;
}

/* Runs a session request with the fork seed filled with seed_byte and
 * copies its result text (empty when it has none). False if it failed. */
static bool session_result(struct kvmfork_mailbox *mb, uint64_t seq, const char *name,
                           uint32_t flags, uint8_t seed_byte, const char *code, char *result,
                           size_t result_size)
{
    memset(mb->base + KVMFORK_MB_FORK_SEED_OFF, seed_byte, KVMFORK_MB_SEED_LEN);
    run_case(mb, seq, name, KVMFORK_LANG_PYTHON, SESSION | flags, code, (uint32_t)strlen(code),
             4096, 4096);
    memset(mb->base + KVMFORK_MB_FORK_SEED_OFF, 0, KVMFORK_MB_SEED_LEN);
    uint32_t len = kvmfork_mb_read32(mb, KVMFORK_MB_RESP_RESULT_LEN_OFF);
    if (kvmfork_mb_read32(mb, KVMFORK_MB_RESP_STATUS_OFF) != KVMFORK_STATUS_OK ||
        kvmfork_mb_read32(mb, KVMFORK_MB_RESP_EXIT_CODE_OFF) != 0 || len >= result_size) {
        kvmfork_log("selftest %s FAILED: the request did not run", name);
        return false;
    }
    memcpy(result, mb->base + KVMFORK_MB_RESULT_OFF, len);
    result[len] = '\0';
    return true;
}

/* RESEED only when flagged: a session's own random.seed() survives into
 * its next run; reseeded runs follow the fork seed. */
static bool check_session_reseeding(struct kvmfork_mailbox *mb, uint64_t seq)
{
    char seeded[64], a1[64], b[64], a2[64];
    if (!session_result(mb, seq, "session-seed", RESEED, 0x33, "import random\nrandom.seed(1)",
                        seeded, sizeof seeded) ||
        !session_result(mb, seq + 1, "session-no-reseed", 0, 0x44, "random.random()", seeded,
                        sizeof seeded) ||
        !session_result(mb, seq + 2, "session-reseed", RESEED, 0x33, "random.random()", a1,
                        sizeof a1) ||
        !session_result(mb, seq + 3, "session-reseed", RESEED, 0x44, "random.random()", b,
                        sizeof b) ||
        !session_result(mb, seq + 4, "session-reseed", RESEED, 0x33, "random.random()", a2,
                        sizeof a2))
        return false;
    /* random.seed(1); random.random() in CPython. */
    if (strcmp(seeded, "0.13436424411240122") != 0 || strcmp(a1, a2) != 0 || strcmp(a1, b) == 0) {
        kvmfork_log("selftest session-reseed FAILED: after seed(1) %s; seeds A/B/A %s / %s / %s",
                  seeded, a1, b, a2);
        return false;
    }
    return true;
}

/* ---- the host's interrupt, simulated ----
 *
 * A SIGALRM handler (on its own stack, so the interrupted stack below the
 * red zone is free) does to the interrupted context exactly what the VMM
 * does to the vCPU: RSP -= red zone, push RIP, RIP = the entry the agent
 * published in the mailbox. Returning from the handler resumes the code at
 * the entry with every other register as it was. */
static uint64_t interrupt_entry;
static volatile sig_atomic_t injected;
static volatile sig_atomic_t injection_limit;

static void inject_interrupt(int sig, siginfo_t *info, void *context)
{
    (void)sig;
    (void)info;
    ucontext_t *uc = context;
    greg_t *regs = uc->uc_mcontext.gregs;
    uint64_t rsp = (uint64_t)regs[REG_RSP] - KVMFORK_INTERRUPT_RED_ZONE - 8;
    *(uint64_t *)(uintptr_t)rsp = (uint64_t)regs[REG_RIP];
    regs[REG_RSP] = (greg_t)rsp;
    regs[REG_RIP] = (greg_t)interrupt_entry;
    injected = injected + 1;
    if (injection_limit > 0 && injected > injection_limit) {
        static const char message[] =
            "kvmfork-agent: selftest interrupt FAILED: the run ignores the host's interrupt\n";
        ssize_t ignored = write(2, message, sizeof message - 1);
        (void)ignored;
        _exit(1);
    }
}

static bool interval_timer(long first_us, long interval_us)
{
    struct itimerval timer = {
        .it_interval = {.tv_sec = interval_us / 1000000, .tv_usec = interval_us % 1000000},
        .it_value = {.tv_sec = first_us / 1000000, .tv_usec = first_us % 1000000},
    };
    return setitimer(ITIMER_REAL, &timer, NULL) == 0;
}

/* Integer and floating-point work with many live values, so registers,
 * flags (the loop condition) and SSE state are in use when interrupted. */
__attribute__((noinline, noipa)) static uint64_t register_work(uint64_t iterations, double *fp)
{
    uint64_t a = 1, b = 2, c = 3, d = 4, e = 5, f = 6, g = 7, h = 8, i = 9, j = 10, k = 11;
    double x0 = 1.0, x1 = 0.5, x2 = 0.25, x3 = 2.0, x4 = 3.0, x5 = 0.125;
    for (uint64_t n = 0; n < iterations; n++) {
        a = a * 6364136223846793005ULL + 1442695040888963407ULL;
        b ^= a >> 13;
        c += b * 3;
        d = ((d << 7) | (d >> 57)) ^ c;
        e += d;
        f ^= e >> 3;
        g += f * 5;
        h = h * 7 + g;
        i ^= h >> 11;
        j += i;
        k = (k ^ j) * 3;
        x0 = x0 * 1.0000001 + 1e-9;
        x1 = x1 * 0.9999999 + x0 * 1e-7;
        x2 = x2 + (double)(a >> 40) * 1e-12;
        x3 = x3 * 0.999 + x2 * 0.001;
        x4 = x4 + x3 / (x0 + 1.0);
        x5 = x5 * 0.5 + x4 * 1e-9;
    }
    *fp = x0 + x1 + x2 + x3 + x4 + x5;
    return a ^ b ^ c ^ d ^ e ^ f ^ g ^ h ^ i ^ j ^ k;
}

static bool check_interrupts(struct kvmfork_mailbox *mb, uint64_t seq)
{
    interrupt_entry = kvmfork_mb_read64(mb, KVMFORK_MB_INTERRUPT_ENTRY_OFF);
    if (interrupt_entry != (uint64_t)(uintptr_t)kvmfork_interrupt_entry) {
        kvmfork_log("selftest interrupt FAILED: mailbox entry %#llx, agent entry %p",
                  (unsigned long long)interrupt_entry, (void *)kvmfork_interrupt_entry);
        return false;
    }
    static uint8_t alt_stack[64 * 1024];
    stack_t ss = {.ss_sp = alt_stack, .ss_size = sizeof alt_stack};
    struct sigaction action = {.sa_sigaction = inject_interrupt,
                               .sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART};
    struct sigaction previous;
    sigemptyset(&action.sa_mask);
    if (sigaltstack(&ss, NULL) != 0 || sigaction(SIGALRM, &action, &previous) != 0) {
        kvmfork_log("selftest interrupt FAILED: sigaltstack/sigaction: %s", strerror(errno));
        return false;
    }
    bool passed = true;

    /* 1. Registers, flags and SSE state survive the entry: the same work
     * with and without interrupts every millisecond gives the same bits. */
    volatile uint64_t iterations = 60000000;
    double want_fp, got_fp;
    uint64_t want = register_work(iterations, &want_fp);
    unsigned long entries_before = kvmfork_interrupt_count();
    injected = 0;
    injection_limit = 0;
    interval_timer(1000, 1000);
    uint64_t got = register_work(iterations, &got_fp);
    interval_timer(0, 0);
    unsigned long entries = kvmfork_interrupt_count() - entries_before;
    kvmfork_log("selftest %-20s %d interrupts injected, %lu entries", "interrupt-registers",
              (int)injected, entries);
    if (got != want || memcmp(&got_fp, &want_fp, sizeof got_fp) != 0 || entries < 3 ||
        entries != (unsigned long)injected) {
        kvmfork_log("selftest interrupt-registers FAILED: %#llx %.17g, want %#llx %.17g "
                  "(%d injected, %lu entries)",
                  (unsigned long long)got, got_fp, (unsigned long long)want, want_fp,
                  (int)injected, entries);
        passed = false;
    }

    /* 2. A session run that never ends by itself: KeyboardInterrupt, exit
     * 1, flagged INTERRUPTED; then one that checks its own state after the
     * interrupt; then the namespace is still there and the flag is gone. */
    static const struct selftest_case session_cases[] = {
        {.name = "interrupt-loop", .code = "spins = 0\nwhile True:\n    spins += 1",
         .language = KVMFORK_LANG_PYTHON, .flags = SESSION, .stdout_cap = 4096,
         .stderr_cap = 4096, .expect_status = KVMFORK_STATUS_OK, .expect_exit = 1,
         .expect_stdout = "",
         .expect_stderr_contains = "in <module>\nKeyboardInterrupt\n",
         .expect_flags = KVMFORK_RESP_FLAG_INTERRUPTED, .expect_stdout_len = -1},
        {.name = "interrupt-caught",
         .code = "n, ints, floats = 0, 0, 0.0\ntry:\n    while True:\n"
                 "        n, ints, floats = n + 1, ints + (n + 1) ** 2, floats + (n + 1) * 0.5\n"
                 "except KeyboardInterrupt:\n    print('interrupted')\n"
                 "(n > 0, ints == n * (n + 1) * (2 * n + 1) // 6, floats == n * (n + 1) / 4)",
         .language = KVMFORK_LANG_PYTHON, .flags = SESSION, .stdout_cap = 4096,
         .stderr_cap = 4096, .expect_status = KVMFORK_STATUS_OK, .expect_exit = 0,
         .expect_stdout = "interrupted\n",
         .expect_flags = KVMFORK_RESP_FLAG_INTERRUPTED | HAS_RESULT, .expect_stdout_len = -1,
         .expect_result = "(True, True, True)"},
        {.name = "interrupt-after", .code = "spins > 0 and n > 0", .language = KVMFORK_LANG_PYTHON,
         .flags = SESSION, .stdout_cap = 4096, .stderr_cap = 4096,
         .expect_status = KVMFORK_STATUS_OK, .expect_exit = 0, .expect_stdout = "",
         .expect_flags = HAS_RESULT, .expect_stdout_len = -1, .expect_result = "True"},
    };
    for (size_t i = 0; i < sizeof session_cases / sizeof session_cases[0]; i++, seq++) {
        const struct selftest_case *c = &session_cases[i];
        bool interrupt = (c->expect_flags & KVMFORK_RESP_FLAG_INTERRUPTED) != 0;
        injected = 0;
        injection_limit = 50;
        if (interrupt)
            interval_timer(200000, 200000);
        run_case(mb, seq, c->name, c->language, c->flags, c->code, (uint32_t)strlen(c->code),
                 c->stdout_cap, c->stderr_cap);
        interval_timer(0, 0);
        injection_limit = 0;
        passed &= check_case(mb, seq, c);
    }
    sigaction(SIGALRM, &previous, NULL);
    ss.ss_flags = SS_DISABLE;
    sigaltstack(&ss, NULL);
    return passed;
}

bool kvmfork_selftest_run(struct kvmfork_mailbox *mb, bool measure_dirty)
{
    bool passed = true;
    uint64_t seq = SELFTEST_SEQ_BASE;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++, seq++) {
        const struct selftest_case *c = &cases[i];
        uint32_t code_len = c->code_len_override ? c->code_len_override
                                                 : (uint32_t)strlen(c->code);
        run_case(mb, seq, c->name, c->language, c->flags, c->code, code_len, c->stdout_cap,
                 c->stderr_cap);
        passed &= check_case(mb, seq, c);
    }
    passed &= check_reseeding(mb, seq);
    passed &= check_session_reseeding(mb, seq + 4);
    passed &= check_interrupts(mb, seq + 9);
    if (measure_dirty)
        report_dirtied_pages(mb, seq + 12);
    return passed;
}
