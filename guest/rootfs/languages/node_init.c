/*
 * kvmfork Node.js guest: PID 1 until node takes over.
 *
 * Does what node cannot do for itself as init (mounts, console, crediting
 * the host's boot seed to the kernel CRNG before OpenSSL asks for random
 * bytes), then execs node on the agent (/usr/lib/kvmfork/agent.js) with the
 * flags listed in /usr/lib/kvmfork/node-flags. PID 1 stays: it is node from
 * then on, and the agent (with its N-API addon) maps the mailbox itself.
 * Linked with the language-neutral modules of ../../agent (init.c,
 * entropy.c, mailbox.c, fatal.c, clock.c); see ../../agent-node/.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "agent/agent.h"

#define NODE_BINARY "/usr/bin/node"
#define AGENT_SCRIPT "/usr/lib/kvmfork/agent.js"
#define NODE_FLAGS_FILE "/usr/lib/kvmfork/node-flags"
#define MAX_NODE_ARGS 64

/* argv for node: binary, the flags file's lines, the agent script. */
static void node_argv(char **argv, char *storage, size_t storage_size)
{
    size_t argc = 0;
    argv[argc++] = NODE_BINARY;
    FILE *f = fopen(NODE_FLAGS_FILE, "re");
    if (f == NULL)
        kvmfork_fatal("open %s: %s", NODE_FLAGS_FILE, strerror(errno));
    size_t used = 0;
    while (fgets(storage + used, (int)(storage_size - used), f) != NULL) {
        char *line = storage + used;
        size_t len = strcspn(line, "\n");
        if (line[len] != '\n' && !feof(f))
            kvmfork_fatal("%s: line too long or file too big", NODE_FLAGS_FILE);
        line[len] = '\0';
        used += len + 1;
        if (len == 0)
            continue;
        if (argc >= MAX_NODE_ARGS - 2)
            kvmfork_fatal("%s: too many flags", NODE_FLAGS_FILE);
        argv[argc++] = line;
    }
    fclose(f);
    argv[argc++] = AGENT_SCRIPT;
    argv[argc] = NULL;
}

int main(int argc, char **argv)
{
    (void)argv;
    if (getpid() != 1 || argc != 1) {
        fprintf(stderr, "kvmfork node init: runs only as PID 1 of the guest (the agent's self-test is\n"
                        "  node " AGENT_SCRIPT " --selftest)\n");
        return 2;
    }
    kvmfork_fatal_setup(KVMFORK_MODE_SERVE, NULL);
    kvmfork_init_system();
    struct kvmfork_boot_options options;
    kvmfork_read_boot_options(&options);
    enum kvmfork_mode mode = options.selftest ? KVMFORK_MODE_GUEST_SELFTEST : KVMFORK_MODE_SERVE;
    kvmfork_fatal_setup(mode, NULL);

    static struct kvmfork_mailbox mailbox;
    int err = kvmfork_mailbox_map_devmem(&mailbox, options.mailbox_gpa);
    if (err != 0)
        kvmfork_fatal("mapping the mailbox/doorbell from /dev/mem: %s", strerror(-err));
    kvmfork_fatal_setup(mode, &mailbox);
    kvmfork_mb_write64(&mailbox, KVMFORK_MB_MAGIC_OFF, KVMFORK_MB_MAGIC);
    kvmfork_mb_write32(&mailbox, KVMFORK_MB_ABI_OFF, KVMFORK_ABI_VERSION);
    kvmfork_mb_write32(&mailbox, KVMFORK_MB_AGENT_STATE_OFF, KVMFORK_STATE_BOOTING);
    /* No interrupt entry: the VMM ends a timed-out Node session itself. */
    kvmfork_mb_write64(&mailbox, KVMFORK_MB_INTERRUPT_ENTRY_OFF, 0);
    kvmfork_seed_kernel_rng(&mailbox, options.selftest);

    /* init.c's environment is CPython's; node needs none of those. */
    unsetenv("PYTHONDONTWRITEBYTECODE");
    unsetenv("PYTHONHOME");
    char gpa[32];
    snprintf(gpa, sizeof gpa, "%#llx", (unsigned long long)options.mailbox_gpa);
    setenv("KVMFORK_MAILBOX_GPA", gpa, 1);
    if (options.selftest)
        setenv("KVMFORK_GUEST_SELFTEST", "1", 1);
    char reserve[24];
    snprintf(reserve, sizeof reserve, "%llu",
             options.heap_reserve_set ? (unsigned long long)(options.heap_reserve_bytes >> 20)
                                      : (unsigned long long)KVMFORK_NODE_HEAP_RESERVE_MIB);
    setenv("KVMFORK_HEAP_RESERVE_MIB", reserve, 1);

    static char *node_args[MAX_NODE_ARGS];
    static char storage[4096];
    node_argv(node_args, storage, sizeof storage);
    kvmfork_log("starting node (mailbox at %s)", gpa);
    execv(NODE_BINARY, node_args);
    kvmfork_fatal("exec %s: %s", NODE_BINARY, strerror(errno));
}
