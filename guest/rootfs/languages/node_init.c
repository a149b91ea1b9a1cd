/*
 * forkd Node.js guest: PID 1 until node takes over.
 *
 * Does what node cannot do for itself as init (mounts, console, crediting
 * the host's boot seed to the kernel CRNG before OpenSSL asks for random
 * bytes), then execs node on the agent (/usr/lib/forkd/agent.js) with the
 * flags listed in /usr/lib/forkd/node-flags. PID 1 stays: it is node from
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
#define AGENT_SCRIPT "/usr/lib/forkd/agent.js"
#define NODE_FLAGS_FILE "/usr/lib/forkd/node-flags"
#define MAX_NODE_ARGS 64

/* argv for node: binary, the flags file's lines, the agent script. */
static void node_argv(char **argv, char *storage, size_t storage_size)
{
    size_t argc = 0;
    argv[argc++] = NODE_BINARY;
    FILE *f = fopen(NODE_FLAGS_FILE, "re");
    if (f == NULL)
        forkd_fatal("open %s: %s", NODE_FLAGS_FILE, strerror(errno));
    size_t used = 0;
    while (fgets(storage + used, (int)(storage_size - used), f) != NULL) {
        char *line = storage + used;
        size_t len = strcspn(line, "\n");
        if (line[len] != '\n' && !feof(f))
            forkd_fatal("%s: line too long or file too big", NODE_FLAGS_FILE);
        line[len] = '\0';
        used += len + 1;
        if (len == 0)
            continue;
        if (argc >= MAX_NODE_ARGS - 2)
            forkd_fatal("%s: too many flags", NODE_FLAGS_FILE);
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
        fprintf(stderr, "forkd node init: runs only as PID 1 of the guest (the agent's self-test is\n"
                        "  node " AGENT_SCRIPT " --selftest)\n");
        return 2;
    }
    forkd_fatal_setup(FORKD_MODE_SERVE, NULL);
    forkd_init_system();
    struct forkd_boot_options options;
    forkd_read_boot_options(&options);
    enum forkd_mode mode = options.selftest ? FORKD_MODE_GUEST_SELFTEST : FORKD_MODE_SERVE;
    forkd_fatal_setup(mode, NULL);

    static struct forkd_mailbox mailbox;
    int err = forkd_mailbox_map_devmem(&mailbox, options.mailbox_gpa);
    if (err != 0)
        forkd_fatal("mapping the mailbox/doorbell from /dev/mem: %s", strerror(-err));
    forkd_fatal_setup(mode, &mailbox);
    forkd_mb_write64(&mailbox, FORKD_MB_MAGIC_OFF, FORKD_MB_MAGIC);
    forkd_mb_write32(&mailbox, FORKD_MB_ABI_OFF, FORKD_ABI_VERSION);
    forkd_mb_write32(&mailbox, FORKD_MB_AGENT_STATE_OFF, FORKD_STATE_BOOTING);
    forkd_seed_kernel_rng(&mailbox, options.selftest);

    /* init.c's environment is CPython's; node needs none of those. */
    unsetenv("PYTHONDONTWRITEBYTECODE");
    unsetenv("PYTHONHOME");
    char gpa[32];
    snprintf(gpa, sizeof gpa, "%#llx", (unsigned long long)options.mailbox_gpa);
    setenv("FORKD_MAILBOX_GPA", gpa, 1);
    if (options.selftest)
        setenv("FORKD_GUEST_SELFTEST", "1", 1);

    static char *node_args[MAX_NODE_ARGS];
    static char storage[4096];
    node_argv(node_args, storage, sizeof storage);
    forkd_log("starting node (mailbox at %s)", gpa);
    execv(NODE_BINARY, node_args);
    forkd_fatal("exec %s: %s", NODE_BINARY, strerror(errno));
}
