/* PID 1 duties: file systems, console, environment, boot options. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include "agent.h"

struct mount_spec {
    const char *source;
    const char *target;
    const char *type;
    unsigned long flags;
    const char *data;
};

static const struct mount_spec mounts[] = {
    {"proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL},
    {"sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL},
    {"devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"},
    {"tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"},
    {"tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"},
};

static void attach_console(void)
{
    int fd = open("/dev/console", O_RDWR | O_NOCTTY);
    if (fd < 0)
        return; /* keep whatever the kernel gave us; logging may be lost */
    for (int target = 0; target <= 2; target++)
        if (fd != target)
            dup2(fd, target);
    if (fd > 2)
        close(fd);
}

void kvmfork_init_system(void)
{
    umask(022);
    for (size_t i = 0; i < sizeof mounts / sizeof mounts[0]; i++) {
        const struct mount_spec *m = &mounts[i];
        if (mkdir(m->target, 0755) != 0 && errno != EEXIST)
            kvmfork_fatal("mkdir %s: %s", m->target, strerror(errno));
        if (mount(m->source, m->target, m->type, m->flags, m->data) != 0 && errno != EBUSY)
            kvmfork_fatal("mount %s on %s: %s", m->type, m->target, strerror(errno));
    }
    attach_console();
    setvbuf(stdout, NULL, _IOLBF, 0);

    /* The kernel hands init a few stray variables; start clean. */
    clearenv();
    setenv("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", 1);
    setenv("HOME", "/root", 1);
    setenv("LANG", "C.UTF-8", 1);
    setenv("TMPDIR", "/tmp", 1);
    setenv("PYTHONDONTWRITEBYTECODE", "1", 1);
    /* The stdlib is a zip, so python3 subprocesses cannot find their prefix
     * from a landmark file; tell them. */
    setenv("PYTHONHOME", "/usr", 1);
    if (chdir("/tmp") != 0)
        kvmfork_fatal("chdir /tmp: %s", strerror(errno));
}

/* The value of a "name=value" kernel parameter word, or NULL. */
static const char *option_value(const char *word, const char *name)
{
    size_t n = strlen(name);
    return strncmp(word, name, n) == 0 ? word + n : NULL;
}

void kvmfork_read_boot_options(struct kvmfork_boot_options *options)
{
    options->selftest = false;
    options->mailbox_gpa = KVMFORK_MAILBOX_GPA;
    options->heap_reserve_bytes = (uint64_t)KVMFORK_DEFAULT_HEAP_RESERVE_MIB << 20;
    options->heap_reserve_set = false;

    char cmdline[4096];
    int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        kvmfork_fatal("open /proc/cmdline: %s", strerror(errno));
    ssize_t n = read(fd, cmdline, sizeof cmdline - 1);
    close(fd);
    if (n < 0)
        kvmfork_fatal("read /proc/cmdline: %s", strerror(errno));
    cmdline[n] = '\0';

    char *save = NULL;
    const char *value;
    for (char *word = strtok_r(cmdline, " \t\n", &save); word != NULL;
         word = strtok_r(NULL, " \t\n", &save)) {
        if (strcmp(word, "kvmfork.selftest=1") == 0) {
            options->selftest = true;
        } else if ((value = option_value(word, "kvmfork.mailbox=")) != NULL) {
            char *end = NULL;
            errno = 0;
            unsigned long long gpa = strtoull(value, &end, 0);
            if (errno != 0 || end == value || *end != '\0' || gpa % 4096 != 0)
                kvmfork_fatal("bad %s (want a page-aligned address)", word);
            options->mailbox_gpa = gpa;
        } else if ((value = option_value(word, "kvmfork.heap_reserve_mib=")) != NULL) {
            char *end = NULL;
            errno = 0;
            unsigned long long mib = strtoull(value, &end, 10);
            if (errno != 0 || end == value || *end != '\0' || mib > 4096)
                kvmfork_fatal("bad %s (want 0..4096)", word);
            options->heap_reserve_bytes = mib << 20;
            options->heap_reserve_set = true;
        }
    }
}
