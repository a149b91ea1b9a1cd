/*
 * forkd guest agent entry point.
 *
 * One binary, three roles, chosen by how it is started:
 *   - PID 1 (the initramfs's /init): boot, warm up, ring READY, serve
 *     requests forever; or, with forkd.selftest=1, run the self-test and
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

static struct forkd_mailbox mailbox;

static void boot_python(struct forkd_mailbox *mb, uint64_t heap_reserve_bytes)
{
    forkd_tsc_calibration_begin();
    forkd_python_start();
    forkd_python_warm_up(mb);
    forkd_python_prepare_template();
    forkd_memory_prefault(heap_reserve_bytes);
    forkd_tsc_calibration_end();
}

__attribute__((noreturn)) static void serve(struct forkd_mailbox *mb)
{
    /* Clean response area: the host must not mistake warm-up results. */
    forkd_mb_write64(mb, FORKD_MB_RESP_SEQ_OFF, 0);
    forkd_mb_write32(mb, FORKD_MB_RESP_STDOUT_LEN_OFF, 0);
    forkd_mb_write32(mb, FORKD_MB_RESP_STDERR_LEN_OFF, 0);
    forkd_mb_write32(mb, FORKD_MB_AGENT_STATE_OFF, FORKD_STATE_READY);
    forkd_log("ready: ringing the doorbell");
    /* The snapshot is taken at this store; every fork resumes right after
     * it with its request already in the mailbox. */
    forkd_ring(mb, FORKD_DOORBELL_READY);
    for (;;) {
        forkd_handle_request(mb);
        forkd_ring(mb, FORKD_DOORBELL_DONE);
    }
}

static int run_as_pid1(void)
{
    forkd_fatal_setup(FORKD_MODE_SERVE, NULL);
    forkd_init_system();
    struct forkd_boot_options options;
    forkd_read_boot_options(&options);
    enum forkd_mode mode = options.selftest ? FORKD_MODE_GUEST_SELFTEST : FORKD_MODE_SERVE;
    forkd_fatal_setup(mode, NULL);
    forkd_log("starting (%s, mailbox at %#llx, heap reserve %llu MiB)",
              options.selftest ? "self-test" : "serve", (unsigned long long)options.mailbox_gpa,
              (unsigned long long)(options.heap_reserve_bytes >> 20));

    int err = forkd_mailbox_map_devmem(&mailbox, options.mailbox_gpa);
    if (err != 0)
        forkd_fatal("mapping the mailbox/doorbell from /dev/mem: %s", strerror(-err));
    forkd_fatal_setup(mode, &mailbox);
    forkd_mb_write64(&mailbox, FORKD_MB_MAGIC_OFF, FORKD_MB_MAGIC);
    forkd_mb_write32(&mailbox, FORKD_MB_ABI_OFF, FORKD_ABI_VERSION);
    forkd_mb_write32(&mailbox, FORKD_MB_AGENT_STATE_OFF, FORKD_STATE_BOOTING);

    forkd_seed_kernel_rng(&mailbox, options.selftest);
    forkd_memory_configure();
    boot_python(&mailbox, options.heap_reserve_bytes);
    if (!options.selftest)
        serve(&mailbox);
    forkd_log("template ready after %.1f s of uptime; running the self-test",
              forkd_uptime_seconds());
    forkd_selftest_finish(forkd_selftest_run(&mailbox, false));
}

static int run_host_selftest(void)
{
    forkd_fatal_setup(FORKD_MODE_HOST_SELFTEST, NULL);
    int err = forkd_mailbox_map_anonymous(&mailbox);
    if (err != 0)
        forkd_fatal("mapping a private mailbox: %s", strerror(-err));
    forkd_fatal_setup(FORKD_MODE_HOST_SELFTEST, &mailbox);
    forkd_memory_configure();
    boot_python(&mailbox, (uint64_t)FORKD_DEFAULT_HEAP_RESERVE_MIB << 20);
    forkd_selftest_finish(forkd_selftest_run(&mailbox, true));
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
            "  (as PID 1 this is the forkd guest agent; as python3 it is CPython)\n",
            argc > 0 ? argv[0] : "init");
    return 2;
}
