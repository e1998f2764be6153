/* What virtio-net's ring threads share (net_receiver.c, net_transmitter.c): guest RAM's regions
   held from Python, the hand-shake that lends a queue to a thread and takes it back, the
   thread's eventfds and its place off the VM's shared CPU.

   A thread serves between begin (Python lent it the queue) and a stop: one Python asked for
   (ring_thread_stop returns once the thread is outside its work) or one it made itself (it met
   something it does not serve: `stopped` says what, and it reports). It reports through an
   eventfd once per burst: the I/O thread takes what was done. Each .c includes this once. */

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <unistd.h>

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define MAX_QUEUE 32768

static inline uint16_t load16(const char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline void store16(char *p, uint16_t v) { memcpy(p, &v, 2); }
static inline void store32(char *p, uint32_t v) { memcpy(p, &v, 4); }

/* A descriptor's four fields. */
typedef struct {
    uint64_t address;
    uint32_t length;
    uint16_t flags, next;
} Descriptor;

static inline Descriptor descriptor_at(const char *table, unsigned index)
{
    const char *d = table + 16 * (size_t)index;
    Descriptor out;
    memcpy(&out.address, d, 8);
    memcpy(&out.length, d + 8, 4);
    memcpy(&out.flags, d + 12, 2);
    memcpy(&out.next, d + 14, 2);
    return out;
}

/* ---- guest RAM -------------------------------------------------------------------------------- */

typedef struct {
    Py_buffer *views;
    uint64_t *bases;
    Py_ssize_t count;
} GuestRegions;

/* (guest base, writable buffer) pairs, held until regions_release(). -1 with a Python error. */
static int regions_hold(GuestRegions *g, PyObject *regions, const char *who)
{
    PyObject *list = PySequence_Fast(regions, "regions is not a sequence");
    if (list == NULL)
        return -1;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(list);
    g->views = PyMem_Calloc(count ? count : 1, sizeof(Py_buffer));
    g->bases = PyMem_Calloc(count ? count : 1, sizeof(uint64_t));
    if (g->views == NULL || g->bases == NULL) {
        Py_DECREF(list);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(list, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_Format(PyExc_TypeError, "%s: a region is (guest base, buffer)", who);
            Py_DECREF(list);
            return -1;
        }
        g->bases[i] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(item, 0));
        if (PyErr_Occurred() || PyObject_GetBuffer(PyTuple_GET_ITEM(item, 1), &g->views[i], PyBUF_WRITABLE) < 0) {
            Py_DECREF(list);
            return -1;
        }
        g->count = i + 1;
    }
    Py_DECREF(list);
    return 0;
}

static void regions_release(GuestRegions *g)
{
    for (Py_ssize_t i = 0; i < g->count; i++)
        PyBuffer_Release(&g->views[i]);
    g->count = 0;
    PyMem_Free(g->views);
    PyMem_Free(g->bases);
    g->views = NULL;
    g->bases = NULL;
}

/* The host address of guest [address, address + size), or NULL where it is not inside one region. */
static char *regions_translate(const GuestRegions *g, uint64_t address, uint64_t size)
{
    for (Py_ssize_t i = 0; i < g->count; i++) {
        uint64_t length = (uint64_t)g->views[i].len;
        if (address >= g->bases[i] && address - g->bases[i] <= length && size <= length - (address - g->bases[i]))
            return (char *)g->views[i].buf + (address - g->bases[i]);
    }
    return NULL;
}

/* A ring's host address; 0 with a Python error where it is not inside one region. */
static int ring_host(const GuestRegions *g, uint64_t address, uint64_t size, char **host, const char *who,
                     const char *what)
{
    *host = regions_translate(g, address, size);
    if (*host == NULL) {
        PyErr_Format(PyExc_ValueError, "%s: the %s at %#llx+%#llx is not inside one region", who, what,
                     (unsigned long long)address, (unsigned long long)size);
        return 0;
    }
    return 1;
}

/* ---- the thread ------------------------------------------------------------------------------- */

enum { RING_SERVED, RING_WAIT_FD, RING_WAIT_KICK, RING_STOPPED };

typedef struct {
    int initialised, closed, threaded, has_thread;
    pthread_mutex_t lock;
    pthread_cond_t changed;
    pthread_t thread;
    int wake, report;          /* eventfds: Python kicks the thread; the thread tells the I/O thread */
    /* under `lock` */
    int serving;               /* between begin and the thread's stop */
    int stop_wanted;
    int busy;                  /* the thread is inside its work */
    int reported;              /* the report eventfd was written since the last take */
    const char *stopped;       /* why it stopped by itself, for the take */
} RingThread;

static void signal_fd(int fd)
{
    uint64_t one = 1;
    if (write(fd, &one, sizeof one) < 0) {
        /* (an eventfd's counter does not fill up at one add per take) */
    }
}

static void drain(int fd)
{
    uint64_t value;
    if (read(fd, &value, sizeof value) < 0) {
        /* EAGAIN: nothing to drain */
    }
}

/* Tell the I/O thread, once until it takes (the lock held). */
static void ring_thread_report(RingThread *t)
{
    if (!t->reported) {
        t->reported = 1;
        signal_fd(t->report);
    }
}

/* The serve function's end (not held): a stop by itself leaves with its report, so that a take
   that sees the queue not served also sees why. */
static void ring_thread_finish(RingThread *t, int next, int done)
{
    pthread_mutex_lock(&t->lock);
    if (next == RING_STOPPED)
        t->serving = 0;
    if (next == RING_STOPPED || done)
        ring_thread_report(t);
    pthread_mutex_unlock(&t->lock);
}

static int ring_thread_stop_wanted(RingThread *t)
{
    pthread_mutex_lock(&t->lock);
    int stop = t->stop_wanted || t->closed;
    pthread_mutex_unlock(&t->lock);
    return stop;
}

/* Off the CPU the creating thread was placed on (a software-CPU VM's threads share one,
   host/cpu_affinity.py), where the process may run elsewhere: this thread's work is what that
   CPU should not do. */
static void leave_the_shared_cpu(void)
{
    cpu_set_t mine, process, other;
    if (sched_getaffinity(0, sizeof mine, &mine) || sched_getaffinity(getpid(), sizeof process, &process))
        return;
    CPU_ZERO(&other);
    for (int cpu = 0; cpu < CPU_SETSIZE; cpu++)
        if (CPU_ISSET(cpu, &process) && !CPU_ISSET(cpu, &mine))
            CPU_SET(cpu, &other);
    if (CPU_COUNT(&other) > 0 && sched_setaffinity(0, sizeof other, &other)) {
        /* refused: it stays where it was placed */
    }
}

/* The thread's life: wait to be lent a queue, serve it until it must wait (for a kick, or for
   `fd` to be readable too), stop where asked or where serve() stopped by itself. */
static void ring_thread_loop(RingThread *t, const char *name, int fd, int (*serve)(void *), void *self)
{
    prctl(PR_SET_NAME, name, 0, 0, 0);
    leave_the_shared_cpu();
    pthread_mutex_lock(&t->lock);
    for (;;) {
        while (!t->closed && (!t->serving || t->stop_wanted)) {
            if (t->serving && t->stop_wanted) {
                t->serving = 0;
                pthread_cond_broadcast(&t->changed);
            }
            pthread_cond_wait(&t->changed, &t->lock);
        }
        if (t->closed)
            break;
        t->busy = 1;
        pthread_mutex_unlock(&t->lock);

        int next = serve(self);
        while (next == RING_WAIT_FD || next == RING_WAIT_KICK) {
            struct pollfd fds[2] = {{.fd = t->wake, .events = POLLIN}, {.fd = fd, .events = POLLIN}};
            int ready = poll(fds, next == RING_WAIT_FD ? 2 : 1, -1);
            if (ready < 0 && errno != EINTR)
                break;
            if (fds[0].revents & POLLIN)
                drain(t->wake);
            if (ring_thread_stop_wanted(t))
                break;
            next = serve(self);
        }

        pthread_mutex_lock(&t->lock);
        t->busy = 0;  /* (a stop by itself cleared `serving` in ring_thread_finish, with its report) */
        pthread_cond_broadcast(&t->changed);
    }
    t->busy = 0;
    pthread_cond_broadcast(&t->changed);
    pthread_mutex_unlock(&t->lock);
}

/* The eventfds and the lock; a thread running `run(self)` where `threaded`. -1 with a Python
   error (nothing is left open). */
static int ring_thread_open(RingThread *t, int threaded, void *(*run)(void *), void *self)
{
    t->threaded = threaded;
    t->wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    t->report = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (t->wake < 0 || t->report < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto fail;
    }
    pthread_mutex_init(&t->lock, NULL);
    pthread_cond_init(&t->changed, NULL);
    t->initialised = 1;
    if (threaded) {
        /* every signal blocked: the process's signals go to its Python threads */
        sigset_t all, before;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &before);
        int error = pthread_create(&t->thread, NULL, run, self);
        pthread_sigmask(SIG_SETMASK, &before, NULL);
        if (error) {
            errno = error;
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
        t->has_thread = 1;
    }
    return 0;

fail:
    t->closed = 1;
    if (t->wake >= 0)
        close(t->wake);
    if (t->report >= 0)
        close(t->report);
    t->wake = t->report = -1;
    return -1;
}

/* 1 where the object can be used; 0 with a Python error. */
static int ring_thread_usable(RingThread *t, const char *who)
{
    if (!t->initialised || t->closed) {
        PyErr_Format(PyExc_RuntimeError, "%s: closed", who);
        return 0;
    }
    return 1;
}

static int ring_thread_serving(RingThread *t)
{
    if (!t->initialised || t->closed)
        return 0;
    pthread_mutex_lock(&t->lock);
    int serving = t->serving;
    pthread_mutex_unlock(&t->lock);
    return serving;
}

/* 1 while serving or inside its work: the queue is not Python's to give again. */
static int ring_thread_engaged(RingThread *t)
{
    pthread_mutex_lock(&t->lock);
    int engaged = t->serving || t->busy;
    pthread_mutex_unlock(&t->lock);
    return engaged;
}

/* The queue is lent: serve it. */
static void ring_thread_begin(RingThread *t)
{
    pthread_mutex_lock(&t->lock);
    t->stopped = NULL;
    t->stop_wanted = 0;
    t->serving = 1;
    pthread_cond_broadcast(&t->changed);
    pthread_mutex_unlock(&t->lock);
}

/* Returns once the thread is outside its work and serves no more (the GIL released meanwhile). */
static void ring_thread_stop(RingThread *t)
{
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&t->lock);
    if (t->has_thread && (t->serving || t->busy)) {
        t->stop_wanted = 1;
        pthread_cond_broadcast(&t->changed);
        signal_fd(t->wake);
        while (t->serving || t->busy)
            pthread_cond_wait(&t->changed, &t->lock);
    }
    t->serving = 0;
    t->stop_wanted = 0;
    pthread_mutex_unlock(&t->lock);
    Py_END_ALLOW_THREADS
}

/* A take's start (the lock held by the caller afterwards): why it stopped by itself, once, or
   NULL while it serves. */
static const char *ring_thread_taken(RingThread *t)
{
    const char *stopped = t->serving ? NULL : t->stopped;
    t->reported = 0;
    if (!t->serving)
        t->stopped = NULL;
    return stopped;
}

/* Stop for good, end the thread, close the wake eventfd. The report eventfd stays open until
   ring_thread_close_report(): the I/O thread may be about to read it (close it there, once it
   stopped watching it). */
static void ring_thread_close(RingThread *t)
{
    if (!t->initialised || t->closed)
        return;
    pthread_mutex_lock(&t->lock);
    t->closed = 1;
    pthread_cond_broadcast(&t->changed);
    pthread_mutex_unlock(&t->lock);
    if (t->has_thread) {
        signal_fd(t->wake);
        Py_BEGIN_ALLOW_THREADS
        pthread_join(t->thread, NULL);
        Py_END_ALLOW_THREADS
        t->has_thread = 0;
    }
    close(t->wake);
    t->wake = -1;
}

static void ring_thread_close_report(RingThread *t)
{
    if (t->initialised && t->report >= 0)  /* (before ring_thread_open, 0 is no fd of ours) */
        close(t->report);
    t->report = -1;
}

static void ring_thread_destroy(RingThread *t)
{
    ring_thread_close(t);
    ring_thread_close_report(t);
    if (t->initialised) {
        pthread_mutex_destroy(&t->lock);
        pthread_cond_destroy(&t->changed);
        t->initialised = 0;
    }
}
