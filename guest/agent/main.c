/*
 * kvmfork guest agent entry point.
 *
 * One binary, three roles, chosen by how it is started:
 *   - PID 1 (the initramfs's /init): boot, warm up, ring READY, serve
 *     requests forever; or, with kvmfork.selftest=1, run the self-test and
 *     power off.
 *   - `init --selftest` as an ordinary process (e.g. chrooted into the
 *     rootfs on a development machine): the same warm-up and self-test
 *     against a private mailbox, exit status 0 when everything passed.
 *   - invoked as python3 / python3.11 (the rootfs links those names here):
 *     CPython's own command line, sharing libpython with the agent instead
 *     of shipping Debian's statically linked 7 MB interpreter binary.
 */
#include <Python.h>

#include <libgen.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "agent.h"

static struct kvmfork_mailbox mailbox;

/* own_kernel: PID 1 of the guest (may set kernel knobs), not a host self-test. */
static void boot_python(struct kvmfork_mailbox *mb, uint64_t heap_reserve_bytes, bool own_kernel)
{
    kvmfork_tsc_calibration_begin();
    kvmfork_python_start();
    kvmfork_python_warm_up(mb);
    kvmfork_python_prepare_template();
    /* Before READY: the host reads it from the template's mailbox. */
    kvmfork_interrupt_publish(mb);
    kvmfork_memory_prefault(heap_reserve_bytes, own_kernel);
    kvmfork_tsc_calibration_end();
}

__attribute__((noreturn)) static void serve(struct kvmfork_mailbox *mb)
{
    /* Clean response area: the host must not mistake warm-up results. */
    kvmfork_mb_write64(mb, KVMFORK_MB_RESP_SEQ_OFF, 0);
    kvmfork_mb_write32(mb, KVMFORK_MB_RESP_STDOUT_LEN_OFF, 0);
    kvmfork_mb_write32(mb, KVMFORK_MB_RESP_STDERR_LEN_OFF, 0);
    kvmfork_mb_write32(mb, KVMFORK_MB_RESP_RESULT_LEN_OFF, 0);
    kvmfork_mb_write32(mb, KVMFORK_MB_RESP_FLAGS_OFF, 0);
    kvmfork_mb_write32(mb, KVMFORK_MB_AGENT_STATE_OFF, KVMFORK_STATE_READY);
    kvmfork_log("ready: ringing the doorbell");
    /* The snapshot is taken at this store; every fork resumes right after
     * it with its request already in the mailbox. */
    kvmfork_ring(mb, KVMFORK_DOORBELL_READY);
    for (;;) {
        kvmfork_handle_request(mb);
        kvmfork_ring(mb, KVMFORK_DOORBELL_DONE);
    }
}

static int run_as_pid1(void)
{
    kvmfork_fatal_setup(KVMFORK_MODE_SERVE, NULL);
    kvmfork_init_system();
    struct kvmfork_boot_options options;
    kvmfork_read_boot_options(&options);
    enum kvmfork_mode mode = options.selftest ? KVMFORK_MODE_GUEST_SELFTEST : KVMFORK_MODE_SERVE;
    kvmfork_fatal_setup(mode, NULL);
    kvmfork_log("starting (%s, mailbox at %#llx, heap reserve %llu MiB)",
              options.selftest ? "self-test" : "serve", (unsigned long long)options.mailbox_gpa,
              (unsigned long long)(options.heap_reserve_bytes >> 20));

    int err = kvmfork_mailbox_map_devmem(&mailbox, options.mailbox_gpa);
    if (err != 0)
        kvmfork_fatal("mapping the mailbox/doorbell from /dev/mem: %s", strerror(-err));
    kvmfork_fatal_setup(mode, &mailbox);
    kvmfork_mb_write64(&mailbox, KVMFORK_MB_MAGIC_OFF, KVMFORK_MB_MAGIC);
    kvmfork_mb_write32(&mailbox, KVMFORK_MB_ABI_OFF, KVMFORK_ABI_VERSION);
    kvmfork_mb_write32(&mailbox, KVMFORK_MB_AGENT_STATE_OFF, KVMFORK_STATE_BOOTING);

    kvmfork_seed_kernel_rng(&mailbox, options.selftest);
    kvmfork_memory_configure();
    boot_python(&mailbox, options.heap_reserve_bytes, true);
    if (!options.selftest)
        serve(&mailbox);
    kvmfork_log("template ready after %.1f s of uptime; running the self-test",
              kvmfork_uptime_seconds());
    kvmfork_selftest_finish(kvmfork_selftest_run(&mailbox, false));
}

static int run_host_selftest(void)
{
    kvmfork_fatal_setup(KVMFORK_MODE_HOST_SELFTEST, NULL);
    int err = kvmfork_mailbox_map_anonymous(&mailbox);
    if (err != 0)
        kvmfork_fatal("mapping a private mailbox: %s", strerror(-err));
    kvmfork_fatal_setup(KVMFORK_MODE_HOST_SELFTEST, &mailbox);
    kvmfork_memory_configure();
    boot_python(&mailbox, (uint64_t)KVMFORK_DEFAULT_HEAP_RESERVE_MIB << 20, false);
    kvmfork_selftest_finish(kvmfork_selftest_run(&mailbox, true));
}

int main(int argc, char **argv)
{
    char name_buf[256];
    snprintf(name_buf, sizeof name_buf, "%s", argc > 0 ? argv[0] : "");
    if (strncmp(basename(name_buf), "python", 6) == 0)
        return Py_BytesMain(argc, argv);
    if (getpid() == 1)
        return run_as_pid1();
    if (argc == 2 && strcmp(argv[1], "--selftest") == 0)
        return run_host_selftest();
    fprintf(stderr,
            "usage: %s --selftest\n"
            "  (as PID 1 this is the kvmfork guest agent; as python3 it is CPython)\n",
            argc > 0 ? argv[0] : "init");
    return 2;
}
