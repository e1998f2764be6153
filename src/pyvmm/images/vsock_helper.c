/* pyvmm-vsock: the guest side of a vsock stream, for the default guest (busybox has none).
 *
 *   pyvmm-vsock connect PORT [CID]   connect to CID (default 2, the host) : PORT
 *   pyvmm-vsock listen PORT          accept one connection on PORT
 *   pyvmm-vsock cid                  print this guest's CID
 *
 * then copies stdin to the socket and the socket to stdout until both directions end.
 * Built by `pyvmm image build` with gcc -nostdlib -static: raw system calls, no libc,
 * so the initramfs needs no C library.
 */

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;

#define SYS_read 0
#define SYS_write 1
#define SYS_close 3
#define SYS_open 2
#define SYS_ioctl 16
#define SYS_poll 7
#define SYS_socket 41
#define SYS_connect 42
#define SYS_accept 43
#define SYS_shutdown 48
#define SYS_bind 49
#define SYS_listen 50
#define SYS_exit_group 231

#define AF_VSOCK 40
#define SOCK_STREAM 1
#define SHUT_WR 1
#define POLLIN 1
#define POLLHUP 16
#define POLLERR 8

struct sockaddr_vm {
    u16 family;
    u16 reserved1;
    u32 port;
    u32 cid;
    unsigned char zero[4];
};

struct pollfd {
    int fd;
    short events;
    short revents;
};

static long sys(long n, long a, long b, long c) {
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return ret;
}

static u64 length(const char *s) {
    u64 n = 0;
    while (s[n]) n++;
    return n;
}

static void fail(const char *what, long err) {
    char digits[24];
    int i = sizeof digits;
    u64 v = (u64)(-err);
    digits[--i] = '\n';
    do digits[--i] = '0' + v % 10; while ((v /= 10) && i > 1);
    sys(SYS_write, 2, (long)"pyvmm-vsock: ", 13);
    sys(SYS_write, 2, (long)what, length(what));
    sys(SYS_write, 2, (long)" failed, errno ", 15);
    sys(SYS_write, 2, (long)(digits + i), sizeof digits - i);
    sys(SYS_exit_group, 1, 0, 0);
}

static u32 number(const char *s) {
    u32 v = 0;
    if (!*s) fail("parsing a number", -22);
    for (; *s; s++) {
        if (*s < '0' || *s > '9') fail("parsing a number", -22);
        v = v * 10 + (*s - '0');
    }
    return v;
}

static int same(const char *a, const char *b) {
    while (*a && *a == *b) a++, b++;
    return *a == *b;
}

static int write_all(int fd, const char *buf, long n) {
    while (n > 0) {
        long w = sys(SYS_write, fd, (long)buf, n);
        if (w <= 0) return -1;
        buf += w;
        n -= w;
    }
    return 0;
}

static int print_cid(void) {
    u32 cid = 0;
    char digits[16];
    int i = sizeof digits;
    long fd = sys(SYS_open, (long)"/dev/vsock", 0, 0);
    if (fd < 0) fail("open /dev/vsock", fd);
    long r = sys(SYS_ioctl, fd, 0x7b9 /* IOCTL_VM_SOCKETS_GET_LOCAL_CID */, (long)&cid);
    if (r < 0) fail("IOCTL_VM_SOCKETS_GET_LOCAL_CID", r);
    digits[--i] = '\n';
    do digits[--i] = '0' + cid % 10; while ((cid /= 10) && i > 0);
    return write_all(1, digits + i, sizeof digits - i) < 0;
}

static int run(int argc, char **argv) {
    static char buf[65536];
    if (argc == 2 && same(argv[1], "cid")) return print_cid();
    if (argc < 3) {
        static const char usage[] = "usage: pyvmm-vsock connect PORT [CID] | listen PORT | cid\n";
        sys(SYS_write, 2, (long)usage, sizeof usage - 1);
        return 2;
    }
    struct sockaddr_vm addr = {AF_VSOCK, 0, number(argv[2]), 2, {0}};
    long sock = sys(SYS_socket, AF_VSOCK, SOCK_STREAM, 0);
    if (sock < 0) fail("socket", sock);
    if (same(argv[1], "connect")) {
        if (argc > 3) addr.cid = number(argv[3]);
        long r = sys(SYS_connect, sock, (long)&addr, sizeof addr);
        if (r < 0) fail("connect", r);
    } else if (same(argv[1], "listen")) {
        addr.cid = 0xFFFFFFFFu; /* VMADDR_CID_ANY */
        long r = sys(SYS_bind, sock, (long)&addr, sizeof addr);
        if (r < 0) fail("bind", r);
        r = sys(SYS_listen, sock, 1, 0);
        if (r < 0) fail("listen", r);
        long conn = sys(SYS_accept, sock, 0, 0);
        if (conn < 0) fail("accept", conn);
        sys(SYS_close, sock, 0, 0);
        sock = conn;
    } else {
        fail("parsing the mode", -22);
    }
    struct pollfd fds[2] = {{0, POLLIN, 0}, {(int)sock, POLLIN, 0}};
    int stdin_open = 1;
    for (;;) {
        fds[0].fd = stdin_open ? 0 : -1;
        long r = sys(SYS_poll, (long)fds, 2, -1);
        if (r < 0) fail("poll", r);
        if (fds[0].revents & (POLLIN | POLLHUP | POLLERR)) {
            long n = sys(SYS_read, 0, (long)buf, sizeof buf);
            if (n <= 0) {
                stdin_open = 0;
                sys(SYS_shutdown, sock, SHUT_WR, 0);
            } else if (write_all((int)sock, buf, n) < 0) {
                return 1;
            }
        }
        if (fds[1].revents & (POLLIN | POLLHUP | POLLERR)) {
            long n = sys(SYS_read, sock, (long)buf, sizeof buf);
            if (n <= 0) return n < 0 ? 1 : 0;
            if (write_all(1, buf, n) < 0) return 1;
        }
    }
}

__attribute__((used)) static void start_c(long *stack) {
    int argc = (int)stack[0];
    sys(SYS_exit_group, run(argc, (char **)(stack + 1)), 0, 0);
}

__asm__(".globl _start\n_start:\n  mov %rsp, %rdi\n  and $-16, %rsp\n  call start_c\n");
