/* pyvmm-agent: the guest agent of pyvmm's default image. It listens on vsock port 52 and
 * serves each connection in its own process: one request per connection, in the framed
 * protocol of pyvmm/agent/protocol.py (the reference; the numbers below must match it):
 *
 *   frame   = u32 little-endian length of (type + payload), u8 type, payload
 *   EXEC    u32 argc, u32 envc, argc NUL-terminated args, envc "K=V\0", cwd "\0"
 *           -> STDOUT/STDERR chunks, then EXIT (u32 code, u32 signal) or ERROR (text)
 *   STDIN   bytes for the command's stdin; an empty one closes it
 *   SIGNAL  u32: send this signal to the command's process group
 *   READ    path "\0" -> DATA chunks, an empty DATA at the end; or ERROR
 *   WRITE   u32 mode, path "\0", then DATA chunks and an empty DATA -> DONE or ERROR
 *   IDENTITY u64 seconds, u32 nanoseconds, machine id "\0", entropy bytes -> DONE or ERROR:
 *           a restored guest's own identity (set the wall clock, write /etc/machine-id,
 *           credit the entropy to the random pool and reseed the kernel's CRNG with it);
 *           after its DONE the connection may carry one more request (EXEC, READ, WRITE)
 *
 * Built by `pyvmm image build` with gcc -static (glibc): fork/exec, pipes and poll.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <time.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/random.h>
#include <linux/vm_sockets.h>

#define AGENT_PORT 52
#define MAX_FRAME (1u << 20)
#define CHUNK 65536

enum {
    T_EXEC = 1, T_STDIN = 2, T_READ = 3, T_WRITE = 4, T_DATA = 5, T_SIGNAL = 6, T_IDENTITY = 7,
    T_STDOUT = 16, T_STDERR = 17, T_EXIT = 18, T_ERROR = 19, T_DONE = 20,
};

static int conn = -1;
static unsigned char payload[MAX_FRAME];

static int read_exact(int fd, void *buf, size_t n) {
    unsigned char *p = buf;
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static int write_exact(int fd, const void *buf, size_t n) {
    const unsigned char *p = buf;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static pid_t running = 0; /* the process group of the command being served, if any */

static void send_frame(int type, const void *data, uint32_t n) {
    unsigned char head[5];
    uint32_t len = n + 1;
    memcpy(head, &len, 4); /* x86-64: little-endian */
    head[4] = (unsigned char)type;
    if (write_exact(conn, head, 5) < 0 || write_exact(conn, data, n) < 0) {
        /* the host went away while output was on its way: the command must not run on */
        if (running > 0) kill(-running, SIGKILL);
        _exit(1);
    }
}

static void send_error(const char *what, const char *name, int err) {
    char text[1024];
    int n = snprintf(text, sizeof text, "%s %s: %s", what, name, strerror(err));
    send_frame(T_ERROR, text, n < 0 ? 0 : (uint32_t)(n < (int)sizeof text ? n : (int)sizeof text - 1));
}

static int send_error_fail(const char *what, const char *name, int err) {
    send_error(what, name, err);
    return -1;
}

/* One frame into `payload`: its type, or -1 at end of stream / on a malformed frame. */
static int recv_frame(uint32_t *n) {
    unsigned char head[5];
    uint32_t len;
    if (read_exact(conn, head, 5) < 0) return -1;
    memcpy(&len, head, 4);
    if (len < 1 || len - 1 > MAX_FRAME) return -1;
    *n = len - 1;
    if (read_exact(conn, payload, *n) < 0) return -1;
    return head[4];
}

/* The NUL-terminated string at *pos in payload[0..n), or NULL when there is none. */
static char *take_string(uint32_t n, uint32_t *pos) {
    char *start = (char *)payload + *pos;
    void *end = memchr(start, 0, n - *pos);
    if (*pos >= n || !end) return NULL;
    *pos = (uint32_t)((char *)end - (char *)payload) + 1;
    return start;
}

static void serve_read(uint32_t n) {
    uint32_t pos = 0;
    char *path = take_string(n, &pos);
    if (!path) _exit(1);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return send_error("open", path, errno);
    for (;;) {
        ssize_t r = read(fd, payload, CHUNK);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return send_error("read", path, errno);
        send_frame(T_DATA, payload, (uint32_t)r);
        if (r == 0) return;
    }
}

static void serve_write(uint32_t n) {
    uint32_t mode, pos = 4, len;
    if (n < 4) _exit(1);
    memcpy(&mode, payload, 4);
    char path[4096];
    char *name = take_string(n, &pos);
    if (!name || strlen(name) >= sizeof path) _exit(1);
    strcpy(path, name);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode & 07777);
    int err = fd < 0 ? errno : 0;
    for (;;) {
        if (recv_frame(&len) != T_DATA) _exit(1);
        if (len == 0) break;
        if (!err && write_exact(fd, payload, len) < 0) err = errno ? errno : EIO;
    }
    if (!err && fsync(fd) < 0) err = errno;
    if (fd >= 0 && close(fd) < 0 && !err) err = errno;
    if (err) return send_error(fd < 0 ? "open" : "write", path, err);
    send_frame(T_DONE, "", 0);
}

/* The machine id is 32 lowercase hex digits, as systemd's machine-id(5) has it. */
static int valid_machine_id(const char *id) {
    if (strlen(id) != 32) return 0;
    for (const char *c = id; *c; c++)
        if (!((*c >= '0' && *c <= '9') || (*c >= 'a' && *c <= 'f'))) return 0;
    return 1;
}

static int serve_identity(uint32_t n) {
    uint64_t seconds;
    uint32_t nanoseconds, pos = 12;
    if (n < 12) _exit(1);
    memcpy(&seconds, payload, 8);
    memcpy(&nanoseconds, payload + 8, 4);
    char *id = take_string(n, &pos);
    if (!id || !valid_machine_id(id) || nanoseconds >= 1000000000u) _exit(1);
    uint32_t entropy_len = n - pos;
    if (entropy_len > 512) _exit(1);

    /* The random pool first: nothing below should draw from the old one's twin. */
    if (entropy_len) {
        struct { int entropy_count, buf_size; unsigned char buf[512]; } pool;
        pool.entropy_count = (int)entropy_len * 8;
        pool.buf_size = (int)entropy_len;
        memcpy(pool.buf, payload + pos, entropy_len);
        int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
        if (fd < 0) return send_error_fail("open", "/dev/urandom", errno);
        if (ioctl(fd, RNDADDENTROPY, &pool) < 0) { int e = errno; close(fd); return send_error_fail("add entropy to", "/dev/urandom", e); }
        /* ENODATA: the CRNG was not ready yet; the credited entropy just made it so. */
        if (ioctl(fd, RNDRESEEDCRNG) < 0 && errno != ENODATA) { int e = errno; close(fd); return send_error_fail("reseed", "/dev/urandom", e); }
        close(fd);
    }
    struct timespec now = {.tv_sec = (time_t)seconds, .tv_nsec = (long)nanoseconds};
    if (clock_settime(CLOCK_REALTIME, &now) < 0) return send_error_fail("set", "CLOCK_REALTIME", errno);

    char line[34];
    snprintf(line, sizeof line, "%s\n", id);
    mkdir("/etc", 0755);
    int fd = open("/etc/.machine-id.new", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0444);
    if (fd < 0) return send_error_fail("open", "/etc/.machine-id.new", errno);
    int err = write_exact(fd, line, 33) < 0 ? (errno ? errno : EIO) : 0;
    if (close(fd) < 0 && !err) err = errno;
    if (!err && rename("/etc/.machine-id.new", "/etc/machine-id") < 0) err = errno;
    if (err) return send_error_fail("write", "/etc/machine-id", err);
    send_frame(T_DONE, "", 0);
    return 0;
}

static void serve_exec(uint32_t n) {
    uint32_t argc, envc, pos = 8;
    if (n < 8) _exit(1);
    memcpy(&argc, payload, 4);
    memcpy(&envc, payload + 4, 4);
    if (argc < 1 || argc > 65536 || envc > 65536) _exit(1);
    char **argv = calloc(argc + 1, sizeof *argv), **env = calloc(envc + 1, sizeof *env);
    for (uint32_t i = 0; i < argc; i++) if (!(argv[i] = take_string(n, &pos))) _exit(1);
    for (uint32_t i = 0; i < envc; i++) if (!(env[i] = take_string(n, &pos))) _exit(1);
    char *cwd = take_string(n, &pos);
    if (!cwd) _exit(1);
    /* The frame buffer is reused for stdin: keep the command line in its own copy. */
    char *copy = malloc(n);
    memcpy(copy, payload, n);
    for (uint32_t i = 0; i < argc; i++) argv[i] = copy + ((unsigned char *)argv[i] - payload);
    for (uint32_t i = 0; i < envc; i++) env[i] = copy + ((unsigned char *)env[i] - payload);
    cwd = copy + ((unsigned char *)cwd - payload);

    int in[2], out[2], err[2], status_pipe[2];
    if (pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC) || pipe2(status_pipe, O_CLOEXEC))
        return send_error("pipe", "for", errno);
    pid_t child = fork();
    if (child < 0) return send_error("fork", argv[0], errno);
    if (child == 0) {
        setsid();
        signal(SIGPIPE, SIG_DFL);
        dup2(in[0], 0);
        dup2(out[1], 1);
        dup2(err[1], 2);
        for (uint32_t i = 0; i < envc; i++) putenv(env[i]);
        int failure[2] = {0, 0}; /* {1: chdir, 2: exec}, errno */
        if (*cwd && chdir(cwd) < 0) {
            failure[0] = 1;
        } else {
            execvp(argv[0], argv);
            failure[0] = 2;
        }
        failure[1] = errno;
        if (write(status_pipe[1], failure, sizeof failure) < 0) _exit(126);
        _exit(127);
    }
    running = child;
    close(in[0]);
    close(out[1]);
    close(err[1]);
    close(status_pipe[1]);
    int failure[2];
    if (read(status_pipe[0], failure, sizeof failure) == (ssize_t)sizeof failure) { /* else: exec'd */
        waitpid(child, NULL, 0);
        running = 0;
        return send_error(failure[0] == 1 ? "chdir" : "exec", failure[0] == 1 ? cwd : argv[0], failure[1]);
    }
    close(status_pipe[0]);
    fcntl(in[1], F_SETFL, O_NONBLOCK);

    /* Stdin waiting for the command to read it; new frames are read only once it is gone, so
     * a command that does not read stdin never makes the agent stop forwarding its output. */
    unsigned char *pending = malloc(MAX_FRAME);
    uint32_t pending_len = 0, pending_off = 0;
    int stdin_fd = in[1], stdin_closing = 0, open_outputs = 2;
    static unsigned char chunk[CHUNK];
    while (open_outputs > 0) {
        struct pollfd fds[4] = {
            {out[0], POLLIN, 0}, {err[0], POLLIN, 0},
            {pending_len > pending_off ? stdin_fd : -1, POLLOUT, 0},
            {pending_len > pending_off || conn < 0 ? -1 : conn, POLLIN, 0},
        };
        if (poll(fds, 4, -1) < 0) {
            if (errno == EINTR) continue;
            _exit(1);
        }
        for (int i = 0; i < 2; i++) {
            if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            ssize_t r = read(fds[i].fd, chunk, sizeof chunk);
            if (r > 0) {
                send_frame(i == 0 ? T_STDOUT : T_STDERR, chunk, (uint32_t)r);
            } else if (r == 0 || errno != EINTR) {
                close(fds[i].fd);
                if (i == 0) out[0] = -1; else err[0] = -1;
                open_outputs--;
            }
        }
        if (fds[2].revents) {
            ssize_t w = write(stdin_fd, pending + pending_off, pending_len - pending_off);
            if (w > 0) pending_off += (uint32_t)w;
            else if (w < 0 && errno != EAGAIN && errno != EINTR) pending_off = pending_len; /* EPIPE: dropped */
            if (pending_off == pending_len && stdin_closing) { close(stdin_fd); stdin_fd = -1; }
        }
        if (fds[3].revents) {
            uint32_t len;
            int type = recv_frame(&len);
            if (type < 0) { /* the host went away: end the command */
                kill(-child, SIGKILL);
                _exit(1);
            } else if (type == T_STDIN && stdin_fd >= 0) {
                if (len == 0) { close(stdin_fd); stdin_fd = -1; }
                else { memcpy(pending, payload, len); pending_len = len; pending_off = 0; }
            } else if (type == T_SIGNAL && len == 4) {
                uint32_t sig;
                memcpy(&sig, payload, 4);
                kill(-child, (int)sig);
            }
        }
    }
    int status;
    while (waitpid(child, &status, 0) < 0 && errno == EINTR) {}
    running = 0; /* reaped: its pid may be reused */
    uint32_t result[2] = {WIFEXITED(status) ? (uint32_t)WEXITSTATUS(status) : 128u + (uint32_t)WTERMSIG(status),
                          WIFSIGNALED(status) ? (uint32_t)WTERMSIG(status) : 0};
    send_frame(T_EXIT, result, sizeof result);
}

static void serve(void) {
    uint32_t n;
    signal(SIGCHLD, SIG_DFL);
    int type = recv_frame(&n);
    if (type == T_IDENTITY) { /* a restored guest's identity first, then (maybe) its first request */
        if (serve_identity(n) == 0) type = recv_frame(&n);
        else type = -1;
    }
    switch (type) {
    case T_EXEC: serve_exec(n); break;
    case T_READ: serve_read(n); break;
    case T_WRITE: serve_write(n); break;
    default: break;
    }
    shutdown(conn, SHUT_WR);
    _exit(0);
}

int main(void) {
    struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_port = AGENT_PORT, .svm_cid = VMADDR_CID_ANY};
    int sock = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0 || bind(sock, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(sock, 16) < 0) {
        fprintf(stderr, "pyvmm-agent: vsock port %d: %s\n", AGENT_PORT, strerror(errno));
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGCHLD, SIG_IGN); /* connection handlers are reaped by the kernel */
    for (;;) {
        int c = accept4(sock, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0) continue;
        pid_t pid = fork();
        if (pid == 0) {
            close(sock);
            conn = c;
            serve();
        }
        close(c);
    }
}
