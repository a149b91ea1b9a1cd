/*
 * Kernel smoke probe: runs inside the guest (static binary, started by the
 * smoke test's /init) and exercises the kernel paths kvmfork's guest needs,
 * several of which go through guest/kernel/patches on PVM hosts: every
 * syscall (patch 0004), fork/exec/wait, signal delivery and rt_sigreturn,
 * a timer signal interrupting a user-mode loop, threads (clone + futex),
 * epoll/eventfd/timerfd, AF_UNIX, mmap/madvise, memfd, user-mode faults
 * (#PF, #DE, #UD, #BP) turned into signals, and the kvmfork mailbox: mapped
 * from /dev/mem, fork generation bumped, then getrandom (patch 0005).
 * Prints "probe: ..." lines; exit status 0 only if every check passed.
 *
 * usage: probe [mailbox-phys-addr]   ("probe child" is its own exec test)
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <unistd.h>
#include <pthread.h>
#include <errno.h>
#include <sys/wait.h>
#include <sys/mman.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <sys/random.h>
#include <sys/time.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdint.h>

static sigjmp_buf jb;
static volatile int last_sig;
static void on_fault(int s) { last_sig = s; siglongjmp(jb, 1); }
static int fault_kind(int kind) {
    last_sig = 0;
    if (sigsetjmp(jb, 1) == 0) {
        volatile int zero = 0;
        if (kind == 0) { int *volatile bad = (int *)16; *bad = 1; }
        else if (kind == 1) { int a = 1, d = 0, z = zero; __asm__ volatile("idivl %2" : "+a"(a), "+d"(d) : "r"(z)); }
        else if (kind == 2) __asm__ volatile("ud2");
        else __asm__ volatile("int3");
    }
    return last_sig;
}

static volatile int got_alarm, got_usr1;
static void on_alarm(int s) { (void)s; got_alarm++; }
static void on_usr1(int s) { (void)s; got_usr1++; }
static void *thr(void *a) { return (void *)((long)a + 1); }
#define CHECK(c) do { if (!(c)) { printf("probe FAIL: %s (errno %d)\n", #c, errno); return 1; } } while (0)

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "child")) return 42;
    unsigned long mailbox = argc > 1 ? strtoul(argv[1], 0, 0) : 0;
    struct timespec t0, t1; clock_gettime(CLOCK_MONOTONIC, &t0);
    pid_t p = fork(); CHECK(p >= 0);
    if (p == 0) { execl("/proc/self/exe", "probe", "child", (char *)0); _exit(99); }
    int st; CHECK(waitpid(p, &st, 0) == p); CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 42);
    printf("probe: fork+exec+wait ok\n");
    signal(SIGUSR1, on_usr1); raise(SIGUSR1); CHECK(got_usr1 == 1);
    struct sigaction sa = {0}; sa.sa_handler = on_alarm; sigaction(SIGALRM, &sa, 0);
    struct itimerval it = {{0,0},{0,20000}}; setitimer(ITIMER_REAL, &it, 0);
    while (!got_alarm) ; /* user-mode spin interrupted by a signal */
    printf("probe: signals ok\n");
    pthread_t th; void *r; CHECK(pthread_create(&th, 0, thr, (void *)41) == 0); CHECK(pthread_join(th, &r) == 0); CHECK((long)r == 42);
    printf("probe: threads ok\n");
    int ep = epoll_create1(0), ev = eventfd(0, 0); CHECK(ep >= 0 && ev >= 0);
    struct epoll_event e = {.events = EPOLLIN}; CHECK(epoll_ctl(ep, EPOLL_CTL_ADD, ev, &e) == 0);
    unsigned long long one = 1; CHECK(write(ev, &one, 8) == 8); CHECK(epoll_wait(ep, &e, 1, 1000) == 1);
    int tf = timerfd_create(CLOCK_MONOTONIC, 0); struct itimerspec its = {{0,0},{0,10000000}};
    CHECK(timerfd_settime(tf, 0, &its, 0) == 0); unsigned long long n; CHECK(read(tf, &n, 8) == 8);
    printf("probe: epoll/eventfd/timerfd ok\n");
    int sv[2]; CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0); CHECK(write(sv[0], "x", 1) == 1); char c; CHECK(read(sv[1], &c, 1) == 1);
    char *m = mmap(0, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0); CHECK(m != MAP_FAILED);
    m[0] = 1; m[(1 << 20) - 1] = 2; CHECK(madvise(m, 1 << 20, MADV_DONTNEED) == 0); CHECK(munmap(m, 1 << 20) == 0);
    int fd = memfd_create("x", 0); CHECK(fd >= 0);
    unsigned char rb[16]; ssize_t g = getrandom(rb, sizeof rb, GRND_NONBLOCK);
    printf("probe: unix/mmap/memfd ok; getrandom nonblock -> %zd (errno %d)\n", g, g < 0 ? errno : 0);
    int mem = open("/dev/mem", O_RDWR | O_SYNC); printf("probe: /dev/mem open -> %d (errno %d)\n", mem, mem < 0 ? errno : 0);
    struct sigaction fs = {0}; fs.sa_handler = on_fault; fs.sa_flags = SA_NODEFER;
    sigaction(SIGSEGV, &fs, 0); sigaction(SIGFPE, &fs, 0); sigaction(SIGILL, &fs, 0); sigaction(SIGTRAP, &fs, 0);
    int k0 = fault_kind(0), k1 = fault_kind(1), k2 = fault_kind(2), k3 = fault_kind(3);
    printf("probe: null-deref -> %d (want %d), div0 -> %d (want %d), ud2 -> %d (want %d), int3 -> %d (want %d)\n",
           k0, SIGSEGV, k1, SIGFPE, k2, SIGILL, k3, SIGTRAP);
    CHECK(k0 == SIGSEGV && k1 == SIGFPE && k2 == SIGILL && k3 == SIGTRAP);
    printf("probe: SIGSEGV/SIGFPE/SIGILL/SIGTRAP delivered and returned\n");
    volatile double d = 1.0; for (int i = 0; i < 1000; i++) d = d * 1.0001 + 0.5; CHECK(d > 1.0);
    if (mailbox) {
        CHECK(mem >= 0);
        volatile uint8_t *mb = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, mem, (off_t)mailbox);
        CHECK(mb != MAP_FAILED);
        unsigned char a[16], b[16];
        CHECK(getrandom(a, 16, 0x4 /* GRND_INSECURE */) == 16);
        for (int i = 0; i < 64; i++) mb[0xc0 + i] = (uint8_t)(i * 7 + 3);
        *(volatile uint64_t *)(mb + 0xa0) += 1; /* what the host does per fork */
        CHECK(getrandom(b, 16, 0x4) == 16); CHECK(memcmp(a, b, 16) != 0);
        printf("probe: mailbox mapped from /dev/mem, fork generation bumped, getrandom ok\n");
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    struct timeval tv; gettimeofday(&tv, 0);
    printf("probe: took %.3f s, wall clock %ld\n", (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9, (long)tv.tv_sec);
    return 0;
}
