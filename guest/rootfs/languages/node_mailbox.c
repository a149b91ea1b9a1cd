/*
 * kvmfork_mailbox.node: what the Node agent cannot do in JavaScript.
 *
 *   contract            every KVMFORK_* number the agent uses, from contract.h
 *   open(gpa?)          maps the mailbox (and the doorbell page) from /dev/mem
 *                       at the guest-physical address `gpa` (a string); with
 *                       no address, a private anonymous mailbox and no
 *                       doorbell (the build-time self-test). Returns the
 *                       mailbox as an external ArrayBuffer over the mapping.
 *   ring(value)         the doorbell: one aligned 32-bit user-mode store
 *   tscBegin()/tscEnd() TSC calibration spanning the warm-up
 *   nowNs()             calibrated TSC time in ns (no syscall)
 *   reseed(bytes)       mixes per-fork bytes into OpenSSL's DRBGs
 *   fatal(message)      reports in the mailbox, rings FATAL, never returns
 *   powerOff()          ends the in-guest self-test (PID 1 must not exit)
 *   loopAlive()         libuv's own test for "the event loop has work left"
 *                       (ref'd handles, timers, thread-pool requests): what
 *                       node checks before emitting 'beforeExit'
 *   heapPolicy()        the malloc policy of ../../agent/heap.h (ArrayBuffer
 *                       and Buffer memory is malloc'ed: no mmap, no trim)
 *   prefaultHeap(mib, ownKernel)
 *                       populates the heap reserve and the stack (heap.h);
 *                       returns {hugePages, seconds, pageFaults,
 *                       anonHugeMib, freeMib}
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/reboot.h>
#include <time.h>
#include <unistd.h>

#include "agent/heap.h"

#include <node_api.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "contract.h"

/* From libuv's stable C API (uv.h ships in libuv1-dev, which nothing else
 * here needs); node resolves it from its own libuv at load time. */
struct uv_loop_s;
int uv_loop_alive(const struct uv_loop_s *loop);

static uint8_t *mailbox;
static volatile uint32_t *doorbell; /* NULL without a VMM */
static uint64_t calibration_tsc;
static double calibration_wall;
static double ns_per_tick;

#define CHECK(env, call)                                                                           \
    do {                                                                                           \
        if ((call) != napi_ok) {                                                                   \
            napi_throw_error((env), NULL, "kvmfork_mailbox: " #call " failed");                      \
            return NULL;                                                                           \
        }                                                                                          \
    } while (0)

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

static double monotonic_seconds(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
        return 0.0;
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void ring_value(uint32_t value)
{
    /* Every mailbox write must be visible before the VMM sees the ring. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (doorbell != NULL)
        *doorbell = value;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

static napi_value undefined(napi_env env)
{
    napi_value v;
    napi_get_undefined(env, &v);
    return v;
}

static int map_devmem(uint64_t gpa)
{
    /* O_SYNC: the host reads this memory behind the guest's caches. */
    int fd = open("/dev/mem", O_RDWR | O_SYNC | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    /* MAP_SHARED: stores reach the physical pages the VMM reads; the page
     * tables are filled at mmap time, so the hot path never faults here. */
    void *base = mmap(NULL, KVMFORK_MAILBOX_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)gpa);
    if (base == MAP_FAILED) {
        int err = errno;
        close(fd);
        return -err;
    }
    void *bell = mmap(NULL, KVMFORK_DOORBELL_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                      (off_t)KVMFORK_DOORBELL_GPA);
    int err = bell == MAP_FAILED ? errno : 0;
    close(fd);
    if (err != 0) {
        munmap(base, KVMFORK_MAILBOX_SIZE);
        return -err;
    }
    mailbox = base;
    doorbell = bell;
    return 0;
}

static napi_value js_open(napi_env env, napi_callback_info info)
{
    size_t argc = 1;
    napi_value argv[1];
    CHECK(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
    if (mailbox != NULL) {
        napi_throw_error(env, NULL, "kvmfork_mailbox: already open");
        return NULL;
    }
    napi_valuetype type = napi_undefined;
    if (argc >= 1)
        CHECK(env, napi_typeof(env, argv[0], &type));
    if (type == napi_string) {
        char text[32];
        size_t len = 0;
        CHECK(env, napi_get_value_string_utf8(env, argv[0], text, sizeof text, &len));
        char *end = NULL;
        errno = 0;
        unsigned long long gpa = strtoull(text, &end, 0);
        if (errno != 0 || end == text || *end != '\0' || gpa % 4096 != 0) {
            napi_throw_range_error(env, NULL, "kvmfork_mailbox: bad mailbox address");
            return NULL;
        }
        int err = map_devmem(gpa);
        if (err != 0) {
            char message[160];
            snprintf(message, sizeof message, "kvmfork_mailbox: mapping /dev/mem at %#llx: %s", gpa,
                     strerror(-err));
            napi_throw_error(env, NULL, message);
            return NULL;
        }
    } else {
        void *base = mmap(NULL, KVMFORK_MAILBOX_SIZE, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        if (base == MAP_FAILED) {
            napi_throw_error(env, NULL, "kvmfork_mailbox: anonymous mapping failed");
            return NULL;
        }
        mailbox = base;
        doorbell = NULL;
    }
    napi_value buffer;
    /* No finalizer: the mapping lives as long as the process. */
    CHECK(env, napi_create_external_arraybuffer(env, mailbox, KVMFORK_MAILBOX_SIZE, NULL, NULL, &buffer));
    return buffer;
}

static napi_value js_ring(napi_env env, napi_callback_info info)
{
    size_t argc = 1;
    napi_value argv[1];
    uint32_t value = 0;
    CHECK(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
    if (argc < 1 || napi_get_value_uint32(env, argv[0], &value) != napi_ok) {
        napi_throw_type_error(env, NULL, "kvmfork_mailbox.ring(value): value must be a u32");
        return NULL;
    }
    ring_value(value);
    return undefined(env);
}

static napi_value js_tsc_begin(napi_env env, napi_callback_info info)
{
    (void)info;
    calibration_wall = monotonic_seconds();
    calibration_tsc = rdtsc();
    return undefined(env);
}

static napi_value js_tsc_end(napi_env env, napi_callback_info info)
{
    (void)info;
    /* The warm-up lasts seconds to minutes: one pair of samples suffices. */
    double wall = monotonic_seconds() - calibration_wall;
    uint64_t ticks = rdtsc() - calibration_tsc;
    if (wall > 0.001 && ticks > 0)
        ns_per_tick = wall * 1e9 / (double)ticks;
    return undefined(env);
}

static napi_value js_now_ns(napi_env env, napi_callback_info info)
{
    (void)info;
    napi_value v;
    CHECK(env, napi_create_double(env, (double)rdtsc() * ns_per_tick, &v));
    return v;
}

static napi_value js_reseed(napi_env env, napi_callback_info info)
{
    size_t argc = 1;
    napi_value argv[1];
    void *data = NULL;
    size_t len = 0;
    CHECK(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
    if (argc < 1 || napi_get_buffer_info(env, argv[0], &data, &len) != napi_ok || len == 0 ||
        len > 1024) {
        napi_throw_type_error(env, NULL, "kvmfork_mailbox.reseed(bytes): 1..1024 bytes in a Buffer");
        return NULL;
    }
    /* One generate with the bytes as additional input on each DRBG moves
     * its state (CTR-DRBG's update mixes additional input into key and V):
     * the primary, so DRBGs that thread-pool threads instantiate later
     * differ per fork, and this thread's public and private ones, which
     * were instantiated in the template. Unlike RAND_seed (a primary
     * reseed that asks the kernel for entropy: ~20 ms of emulated kernel
     * work per fork on PVM hosts) this makes no getrandom call. */
    EVP_RAND_CTX *drbgs[] = {RAND_get0_primary(NULL), RAND_get0_public(NULL),
                             RAND_get0_private(NULL)};
    unsigned char scratch[16];
    for (size_t i = 0; i < sizeof drbgs / sizeof drbgs[0]; i++) {
        if (drbgs[i] == NULL ||
            EVP_RAND_generate(drbgs[i], scratch, sizeof scratch, 0, 0, data, len) != 1) {
            OPENSSL_cleanse(scratch, sizeof scratch);
            napi_throw_error(env, NULL, "kvmfork_mailbox.reseed: OpenSSL refused the reseed");
            return NULL;
        }
    }
    OPENSSL_cleanse(scratch, sizeof scratch);
    return undefined(env);
}

static napi_value js_fatal(napi_env env, napi_callback_info info)
{
    size_t argc = 1;
    napi_value argv[1];
    char message[4096] = "unknown error";
    size_t len = strlen(message);
    if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) == napi_ok && argc >= 1)
        napi_get_value_string_utf8(env, argv[0], message, sizeof message, &len);
    fprintf(stderr, "kvmfork-agent: FATAL: %s\n", message);
    fflush(stderr);
    if (doorbell == NULL)
        exit(1); /* self-test on a development machine */
    memcpy(mailbox + KVMFORK_MB_STDERR_OFF, message, len);
    *(volatile uint32_t *)(mailbox + KVMFORK_MB_RESP_STDERR_LEN_OFF) = (uint32_t)len;
    *(volatile uint32_t *)(mailbox + KVMFORK_MB_RESP_STDOUT_LEN_OFF) = 0;
    *(volatile uint32_t *)(mailbox + KVMFORK_MB_RESP_STATUS_OFF) = KVMFORK_STATUS_AGENT_ERROR;
    ring_value(KVMFORK_DOORBELL_FATAL);
    for (;;) /* PID 1 must not exit: that panics the kernel. */
        pause();
}

static napi_value js_power_off(napi_env env, napi_callback_info info)
{
    (void)info;
    sync();
    reboot(RB_POWER_OFF);
    napi_throw_error(env, NULL, "kvmfork_mailbox.powerOff: reboot failed");
    return NULL;
}

static napi_value js_loop_alive(napi_env env, napi_callback_info info)
{
    (void)info;
    struct uv_loop_s *loop = NULL;
    napi_value v;
    CHECK(env, napi_get_uv_event_loop(env, &loop));
    CHECK(env, napi_get_boolean(env, uv_loop_alive(loop) != 0, &v));
    return v;
}

static napi_status set_number(napi_env env, napi_value obj, const char *name, double value)
{
    napi_value v;
    napi_status s = napi_create_double(env, value, &v);
    return s == napi_ok ? napi_set_named_property(env, obj, name, v) : s;
}

static napi_value js_heap_policy(napi_env env, napi_callback_info info)
{
    (void)info;
    if (kvmfork_heap_policy() != 0) {
        napi_throw_error(env, NULL, "kvmfork_mailbox.heapPolicy: mallopt refused the heap policy");
        return NULL;
    }
    return undefined(env);
}

static napi_value js_prefault_heap(napi_env env, napi_callback_info info)
{
    size_t argc = 2;
    napi_value argv[2];
    uint32_t mib = 0;
    bool own_kernel = false;
    CHECK(env, napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
    if (argc < 2 || napi_get_value_uint32(env, argv[0], &mib) != napi_ok ||
        napi_get_value_bool(env, argv[1], &own_kernel) != napi_ok || mib > 4096) {
        napi_throw_type_error(env, NULL,
                              "kvmfork_mailbox.prefaultHeap(mib, ownKernel): mib 0..4096, ownKernel a boolean");
        return NULL;
    }
    struct kvmfork_heap_report r;
    const char *failed = "";
    int rc = kvmfork_heap_prefault((uint64_t)mib << 20, own_kernel, &r, &failed);
    if (rc != 0) {
        char message[160];
        snprintf(message, sizeof message, "kvmfork_mailbox.prefaultHeap: %s: %s", failed, strerror(-rc));
        napi_throw_error(env, NULL, message);
        return NULL;
    }
    napi_value report, huge;
    CHECK(env, napi_create_object(env, &report));
    CHECK(env, napi_get_boolean(env, r.huge_pages, &huge));
    CHECK(env, napi_set_named_property(env, report, "hugePages", huge));
    CHECK(env, set_number(env, report, "seconds", r.seconds));
    CHECK(env, set_number(env, report, "pageFaults", (double)r.page_faults));
    CHECK(env, set_number(env, report, "anonHugeMib", (double)r.anon_huge_mib));
    CHECK(env, set_number(env, report, "freeMib", (double)r.free_mib));
    return report;
}

static napi_value init(napi_env env, napi_value exports)
{
    static const struct {
        const char *name;
        double value;
    } constants[] = {
#define C(name) {#name, (double)KVMFORK_##name}
        C(NODE_HEAP_RESERVE_MIB), C(MAILBOX_SIZE), C(MB_AGENT_STATE_OFF), C(MB_REQ_SEQ_OFF), C(MB_REQ_LANGUAGE_OFF),
        C(MB_REQ_FLAGS_OFF), C(MB_REQ_TIMEOUT_MS_OFF), C(MB_REQ_CODE_LEN_OFF), C(MB_REQ_STDOUT_CAP_OFF),
        C(MB_REQ_STDERR_CAP_OFF), C(MB_FORK_GENERATION_OFF), C(MB_FORK_SEED_OFF), C(MB_SEED_LEN),
        C(MB_RESP_SEQ_OFF), C(MB_RESP_STATUS_OFF), C(MB_RESP_EXIT_CODE_OFF),
        C(MB_RESP_STDOUT_LEN_OFF), C(MB_RESP_STDERR_LEN_OFF), C(MB_RESP_FLAGS_OFF),
        C(MB_RESP_RESULT_LEN_OFF), C(MB_RESP_EXEC_NS_OFF), C(MB_RESULT_OFF), C(MB_RESULT_MAX),
        C(MB_INTERRUPT_ENTRY_OFF), C(MB_CODE_OFF), C(MB_CODE_MAX), C(MB_STDOUT_OFF), C(MB_STDOUT_MAX),
        C(MB_STDERR_OFF), C(MB_STDERR_MAX), C(DOORBELL_READY), C(DOORBELL_DONE), C(STATE_READY),
        C(STATE_RUNNING), C(STATE_DONE), C(LANG_NODE), C(STATUS_OK), C(STATUS_BAD_REQUEST),
        C(STATUS_AGENT_ERROR), C(RESP_FLAG_STDOUT_TRUNCATED), C(RESP_FLAG_STDERR_TRUNCATED),
        C(RESP_FLAG_HAS_RESULT), C(RESP_FLAG_RESULT_TRUNCATED), C(RESP_FLAG_INTERRUPTED),
        C(REQ_FLAG_SESSION), C(REQ_FLAG_RESEED),
#undef C
    };
    napi_value contract;
    CHECK(env, napi_create_object(env, &contract));
    for (size_t i = 0; i < sizeof constants / sizeof constants[0]; i++)
        CHECK(env, set_number(env, contract, constants[i].name, constants[i].value));
    CHECK(env, napi_set_named_property(env, exports, "contract", contract));

    static const struct {
        const char *name;
        napi_callback fn;
    } functions[] = {
        {"open", js_open},       {"ring", js_ring},     {"tscBegin", js_tsc_begin},
        {"tscEnd", js_tsc_end},  {"nowNs", js_now_ns},  {"reseed", js_reseed},
        {"fatal", js_fatal},     {"powerOff", js_power_off}, {"loopAlive", js_loop_alive},
        {"heapPolicy", js_heap_policy}, {"prefaultHeap", js_prefault_heap},
    };
    for (size_t i = 0; i < sizeof functions / sizeof functions[0]; i++) {
        napi_value fn;
        CHECK(env, napi_create_function(env, functions[i].name, NAPI_AUTO_LENGTH, functions[i].fn,
                                        NULL, &fn));
        CHECK(env, napi_set_named_property(env, exports, functions[i].name, fn));
    }
    return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
