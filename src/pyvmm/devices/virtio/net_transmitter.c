/* virtio-net's transmit path in a thread that never takes the GIL.

   Why: on the software CPU the vCPU thread served each transmit kick itself (inline_kicks.py):
   the frame's writev to the TAP ran the host's TCP inside it (under `iperf3 -R` the guest's
   ACKs: the host's next segments sent and the receive thread woken from within that write),
   about a tenth of the VM's shared CPU, and frames added after a slice's first kick waited for
   the slice's end. Here one thread per NIC, off that CPU, sends the guest's frames as they come
   and returns their buffers; Python hears about it only when the driver wants an interrupt (its
   used_event, or no NO_INTERRUPT flag), and keeps the device's policy and state: the ring
   indices are handed back, exactly, when the thread stops (net.py: lend and take back). Each
   chain is sent and returned in one go, so the thread never holds a request across a stop.

   It serves only what it knows to be simple: chains of device-readable descriptors, direct or
   in one indirect table (where VIRTIO_F_INDIRECT_DESC was negotiated), each piece inside one
   RAM region, at most max_pieces of them and no longer than a frame may be. At anything else
   (a device-writable or nested indirect descriptor, a bad index, a loop, a buffer outside RAM)
   it stops before taking that entry and says why: the Python path (net.py) serves it as it
   always did, errors and all. A frame shorter than its header or one the back-end refuses
   (EAGAIN, EINVAL) is dropped and counted, as the Python path does.

   Transmitter(fd, regions, desc_table, avail_ring, used_ring, size, event_idx, indirect, header,
               max_frame, max_pieces, threaded=True)
     fd: the back-end's non-blocking fd, one frame (header included) per write;
     regions: guest RAM's (guest base, writable buffer) pairs, held until close();
     the queue's rings and size, whether VIRTIO_F_EVENT_IDX and VIRTIO_F_INDIRECT_DESC were
     negotiated; header: the frame header's size; max_frame: the longest frame after it;
     max_pieces: iovecs per write.
   start(last_avail, used_idx, signalled): serve the queue from there; `signalled` is the used
     index the driver was last interrupted at.
   kick(): the driver added frames.
   stop(): return once the thread is outside its work with (last_avail, used_idx); kicks are
     asked for again; the queue is Python's again.
   take(): what was done since the last take: (chains, frames, bytes, dropped, used_idx,
     stopped): stopped is None while it serves, else why it stopped by itself (a short text).
   pump(): without a thread (threaded=False: tests and fuzzing): serve until it would wait.
   fd: an eventfd the thread adds 1 to when the driver wants an interrupt for what it returned
     since the last take, or when it stopped (take() leaves it as it is).
   close(): stop, end the thread, let the regions go; close_fd(): close the report eventfd
     (on the thread that watched it, once it stopped watching: it may be reading it).
   Built by scripts/compile with the compiled group (pyvmm/compiled.py). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <fcntl.h>
#include <sys/uio.h>
#include <time.h>

#include "ring_thread.h"

#define USED_F_NO_NOTIFY 1
#define AVAIL_F_NO_INTERRUPT 1
#define INTERRUPT_CHECK 64     /* chains returned between looks at whether the driver wants an interrupt */
#define LINGER_NS 100000       /* after the ring ran dry, how long to look for the next frame before a kick */

typedef struct {
    PyObject_HEAD
    RingThread t;
    GuestRegions ram;
    int fd;
    char *desc, *avail, *used;
    unsigned size;
    int event_idx, indirect;
    unsigned header;
    uint64_t max_frame;
    int max_pieces;
    struct iovec *iov;
    /* the queue while serving (the thread's own between start and stop) */
    uint16_t last_avail, used_idx, signalled;
    int kicks_off;             /* without EVENT_IDX: NO_NOTIFY set while it serves */
    unsigned since_check;
    /* done since the last take(), under the lock */
    uint64_t done_chains, done_frames, done_bytes, done_dropped;
    uint16_t done_used_idx;
} Transmitter;

static inline uint16_t avail_idx(Transmitter *x)
{
    return __atomic_load_n((volatile uint16_t *)(x->avail + 2), __ATOMIC_ACQUIRE);
}

/* The chain at `head` as iovecs in x->iov (their count), its length in *length; -1 with *why
   where it is not one to serve here. */
static int gather(Transmitter *x, uint16_t head, uint64_t *length, const char **why)
{
    const char *table = x->desc;
    unsigned table_size = x->size, index = head, seen = 0;
    int count = 0, in_indirect = 0;
    uint64_t total = 0;
    for (;;) {
        if (++seen > table_size) {
            *why = "a descriptor chain loops";
            return -1;
        }
        Descriptor d = descriptor_at(table, index);
        if (d.flags & DESC_F_INDIRECT) {
            if (!x->indirect || in_indirect || (d.flags & DESC_F_NEXT) || count || !d.length || d.length % 16 ||
                d.length / 16 > MAX_QUEUE) {
                *why = "an indirect descriptor it does not serve";
                return -1;
            }
            table = regions_translate(&x->ram, d.address, d.length);
            if (table == NULL) {
                *why = "an indirect table outside guest RAM's regions";
                return -1;
            }
            table_size = d.length / 16;
            index = 0;
            seen = 0;
            in_indirect = 1;
            continue;
        }
        if (d.length) {
            if (d.flags & DESC_F_WRITE) {
                *why = "a device-writable descriptor";
                return -1;
            }
            char *host = regions_translate(&x->ram, d.address, d.length);
            if (host == NULL) {
                *why = "a buffer outside guest RAM's regions";
                return -1;
            }
            total += d.length;
            if (count >= x->max_pieces || total > x->header + x->max_frame) {
                *why = "a chain longer than a frame";
                return -1;
            }
            x->iov[count].iov_base = host;
            x->iov[count].iov_len = d.length;
            count++;
        }
        if (!(d.flags & DESC_F_NEXT))
            break;
        if (d.next >= table_size) {
            *why = "a next index outside the table";
            return -1;
        }
        index = d.next;
    }
    *length = total;
    return count;
}

/* With EVENT_IDX a kick for the next entry added (avail_event); else NO_NOTIFY cleared. */
static void ask_for_kicks(Transmitter *x)
{
    if (x->event_idx)
        store16(x->used + 4 + 8 * x->size, x->last_avail);
    else if (x->kicks_off) {
        store16(x->used, 0);
        x->kicks_off = 0;
    }
}

/* While it takes frames anyway, the driver need not kick (with EVENT_IDX: avail_event stays
   behind where the driver is, so its adds pass no event). */
static void refuse_kicks(Transmitter *x)
{
    if (!x->event_idx && !x->kicks_off) {
        store16(x->used, USED_F_NO_NOTIFY);
        x->kicks_off = 1;
    }
}

/* Does the driver want an interrupt for what was returned since the last look (virtio 1.2
   2.7.7.2 / 2.7.10)? */
static int interrupt_wanted(Transmitter *x)
{
    uint16_t old = x->signalled, now = x->used_idx;
    x->since_check = 0;
    if (old == now)
        return 0;
    x->signalled = now;
    if (x->event_idx) {
        uint16_t used_event = load16(x->avail + 4 + 2 * x->size);
        return (uint16_t)(now - used_event - 1) < (uint16_t)(now - old);
    }
    return !(load16(x->avail) & AVAIL_F_NO_INTERRUPT);
}

static uint64_t now_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
}

/* A guest sending a stream adds its next frame soon after the thread sent the last one: were a
   kick asked for at once, each frame would bring one (an exit to the VMM each, on the VM's
   CPU: a 64 KiB-frame stream lost a quarter of its rate to them). So the thread looks again for
   a while, yielding its CPU meanwhile; 1 where a frame came. Not without a thread (pump). */
static int linger(Transmitter *x)
{
    if (!x->t.threaded)
        return 0;
    uint64_t end = now_ns() + LINGER_NS;
    do {
        if (avail_idx(x) != x->last_avail)
            return 1;
        if (ring_thread_stop_wanted(&x->t))
            return 0;
        sched_yield();
    } while (now_ns() < end);
    return 0;
}

/* One chain sent and returned: RING_SERVED; RING_WAIT_KICK with nothing available; RING_STOPPED
   with t.stopped set (the entry left in the ring). */
static int step(Transmitter *x)
{
    uint16_t pending = (uint16_t)(avail_idx(x) - x->last_avail);
    if (pending > x->size) {
        x->t.stopped = "the available index moved past the ring";
        return RING_STOPPED;
    }
    if (pending == 0)
        return RING_WAIT_KICK;
    uint16_t head = load16(x->avail + 4 + 2 * (x->last_avail % x->size));
    if (head >= x->size) {
        x->t.stopped = "a bad head in the available ring";
        return RING_STOPPED;
    }
    uint64_t length = 0;
    const char *why = NULL;
    int count = gather(x, head, &length, &why);
    if (count < 0) {
        x->t.stopped = why;
        return RING_STOPPED;
    }
    x->last_avail++;
    int sent = length >= x->header && writev(x->fd, x->iov, count) >= 0;
    char *element = x->used + 4 + 8 * (size_t)(x->used_idx % x->size);
    store32(element, head);
    store32(element + 4, 0);
    x->used_idx++;
    __atomic_store_n((volatile uint16_t *)(x->used + 2), x->used_idx, __ATOMIC_RELEASE);
    pthread_mutex_lock(&x->t.lock);
    x->done_chains++;
    if (sent) {
        x->done_frames++;
        x->done_bytes += length - x->header;
    } else {
        x->done_dropped++;
    }
    x->done_used_idx = x->used_idx;
    pthread_mutex_unlock(&x->t.lock);
    x->since_check++;
    return RING_SERVED;
}

/* Send until nothing is left (a kick to wait for) or it stops; report where the driver wants
   an interrupt. */
static int serve(void *self)
{
    Transmitter *x = self;
    int next;
    refuse_kicks(x);
    for (;;) {
        next = step(x);
        if (next == RING_SERVED) {
            if (x->since_check >= INTERRUPT_CHECK && interrupt_wanted(x)) {  /* (a long burst) */
                pthread_mutex_lock(&x->t.lock);
                ring_thread_report(&x->t);
                pthread_mutex_unlock(&x->t.lock);
            }
            if (ring_thread_stop_wanted(&x->t))
                break;
            continue;
        }
        if (next == RING_WAIT_KICK) {
            /* the interrupt for what was sent (the driver frees its buffers), a look for more,
               then a kick asked for, and a last look: an entry added meanwhile came without one */
            if (interrupt_wanted(x)) {
                pthread_mutex_lock(&x->t.lock);
                ring_thread_report(&x->t);
                pthread_mutex_unlock(&x->t.lock);
            }
            if (linger(x))
                continue;
            ask_for_kicks(x);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (avail_idx(x) != x->last_avail) {
                refuse_kicks(x);
                continue;
            }
        }
        break;
    }
    ring_thread_finish(&x->t, next, next != RING_STOPPED && interrupt_wanted(x));
    return next;
}

static void *run(void *arg)
{
    Transmitter *x = arg;
    ring_thread_loop(&x->t, "vmm-net-tx", -1, serve, x);
    return NULL;
}

/* ---- Python side -------------------------------------------------------------------------- */

static void release(Transmitter *x)
{
    regions_release(&x->ram);
    free(x->iov);
    x->iov = NULL;
}

static int transmitter_init(Transmitter *x, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"fd", "regions", "desc_table", "avail_ring", "used_ring", "size", "event_idx",
                            "indirect", "header", "max_frame", "max_pieces", "threaded", NULL};
    PyObject *regions;
    unsigned long long desc_table, avail_ring, used_ring, max_frame;
    unsigned size, header;
    int fd, event_idx, indirect, max_pieces, threaded = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iOKKKIppIKi|p:Transmitter", names, &fd, &regions, &desc_table,
                                     &avail_ring, &used_ring, &size, &event_idx, &indirect, &header, &max_frame,
                                     &max_pieces, &threaded))
        return -1;
    if (x->t.initialised || x->t.closed) {
        PyErr_SetString(PyExc_RuntimeError, "Transmitter: already set up");
        return -1;
    }
    if (fd < 0 || !size || size > MAX_QUEUE || (size & (size - 1)) || header > 4096 || !max_frame ||
        max_frame > (1ULL << 24) || max_pieces < 1 || max_pieces > 1024) {
        PyErr_Format(PyExc_ValueError, "Transmitter: fd %d, size %u, header %u, max_frame %llu, max_pieces %d", fd,
                     size, header, max_frame, max_pieces);
        return -1;
    }
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || !(flags & O_NONBLOCK)) {
        PyErr_Format(PyExc_ValueError, "Transmitter: fd %d is not a non-blocking fd (a write would hold the thread)",
                     fd);
        return -1;
    }
    x->t.wake = x->t.report = -1;
    if (regions_hold(&x->ram, regions, "Transmitter") < 0)
        goto fail;
    x->size = size;
    x->event_idx = event_idx;
    x->indirect = indirect;
    x->header = header;
    x->max_frame = max_frame;
    x->max_pieces = max_pieces;
    x->fd = fd;
    if (!ring_host(&x->ram, desc_table, 16ULL * size, &x->desc, "Transmitter", "descriptor table") ||
        !ring_host(&x->ram, avail_ring, 6ULL + 2ULL * size, &x->avail, "Transmitter", "available ring") ||
        !ring_host(&x->ram, used_ring, 6ULL + 8ULL * size, &x->used, "Transmitter", "used ring"))
        goto fail;
    x->iov = calloc((size_t)max_pieces, sizeof(struct iovec));
    if (x->iov == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    if (ring_thread_open(&x->t, threaded, run, x) < 0)
        goto fail;
    return 0;

fail:
    release(x);
    return -1;
}

static PyObject *transmitter_start(Transmitter *x, PyObject *args)
{
    unsigned last_avail, used_idx, signalled;
    if (!PyArg_ParseTuple(args, "III:start", &last_avail, &used_idx, &signalled) ||
        !ring_thread_usable(&x->t, "Transmitter"))
        return NULL;
    if (ring_thread_engaged(&x->t)) {
        PyErr_SetString(PyExc_RuntimeError, "Transmitter: serving already (stop() first)");
        return NULL;
    }
    if (last_avail > 0xFFFF || used_idx > 0xFFFF || signalled > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "Transmitter.start: ring indices are 16-bit");
        return NULL;
    }
    x->last_avail = (uint16_t)last_avail;
    x->used_idx = x->done_used_idx = (uint16_t)used_idx;
    x->signalled = (uint16_t)signalled;
    x->kicks_off = 0;
    x->since_check = 0;
    ring_thread_begin(&x->t);
    Py_RETURN_NONE;
}

static PyObject *transmitter_kick(Transmitter *x, PyObject *unused)
{
    if (!ring_thread_usable(&x->t, "Transmitter"))
        return NULL;
    signal_fd(x->t.wake);
    Py_RETURN_NONE;
}

static PyObject *transmitter_stop(Transmitter *x, PyObject *unused)
{
    if (!ring_thread_usable(&x->t, "Transmitter"))
        return NULL;
    ring_thread_stop(&x->t);
    ask_for_kicks(x);  /* the driver kicks again at its next add: Python serves it */
    return Py_BuildValue("(II)", (unsigned)x->last_avail, (unsigned)x->used_idx);
}

static PyObject *transmitter_take(Transmitter *x, PyObject *unused)
{
    if (!x->t.initialised)
        return Py_BuildValue("(iiiiiO)", 0, 0, 0, 0, 0, Py_None);
    /* (the report eventfd is the I/O thread's to reset) */
    pthread_mutex_lock(&x->t.lock);
    uint64_t chains = x->done_chains, frames = x->done_frames, bytes = x->done_bytes, dropped = x->done_dropped;
    unsigned used_idx = x->done_used_idx;
    const char *stopped = ring_thread_taken(&x->t);
    x->done_chains = x->done_frames = x->done_bytes = x->done_dropped = 0;
    pthread_mutex_unlock(&x->t.lock);
    if (stopped == NULL)
        return Py_BuildValue("(KKKKIO)", chains, frames, bytes, dropped, used_idx, Py_None);
    return Py_BuildValue("(KKKKIs)", chains, frames, bytes, dropped, used_idx, stopped);
}

static PyObject *transmitter_pump(Transmitter *x, PyObject *unused)
{
    if (!ring_thread_usable(&x->t, "Transmitter"))
        return NULL;
    if (x->t.threaded) {
        PyErr_SetString(PyExc_RuntimeError, "Transmitter.pump: a threaded transmitter serves on its thread");
        return NULL;
    }
    if (ring_thread_serving(&x->t))
        serve(x);  /* (a stop by itself clears `serving` there) */
    Py_RETURN_NONE;
}

static PyObject *transmitter_close(Transmitter *x, PyObject *unused)
{
    if (x->t.initialised && !x->t.closed) {
        ring_thread_close(&x->t);
        release(x);
    }
    Py_RETURN_NONE;
}

static PyObject *transmitter_close_fd(Transmitter *x, PyObject *unused)
{
    ring_thread_close_report(&x->t);
    Py_RETURN_NONE;
}

static PyObject *transmitter_fd(Transmitter *x, void *closure)
{
    return PyLong_FromLong(x->t.initialised ? x->t.report : -1);
}

static PyObject *transmitter_serving(Transmitter *x, void *closure)
{
    return PyBool_FromLong(ring_thread_serving(&x->t));
}

static void transmitter_dealloc(Transmitter *x)
{
    ring_thread_destroy(&x->t);
    release(x);  /* (once the thread ended: it reads the regions until then) */
    Py_TYPE(x)->tp_free((PyObject *)x);
}

static PyMethodDef transmitter_methods[] = {
    {"start", (PyCFunction)transmitter_start, METH_VARARGS, "Serve the queue: (last_avail, used_idx, signalled)."},
    {"kick", (PyCFunction)transmitter_kick, METH_NOARGS, "The driver added frames."},
    {"stop", (PyCFunction)transmitter_stop, METH_NOARGS, "Stop serving: (last_avail, used_idx)."},
    {"take", (PyCFunction)transmitter_take, METH_NOARGS,
     "Done since the last take: (chains, frames, bytes, dropped, used_idx, stopped)."},
    {"pump", (PyCFunction)transmitter_pump, METH_NOARGS, "Without a thread: serve until it would wait."},
    {"close", (PyCFunction)transmitter_close, METH_NOARGS, "Stop, end the thread, let guest RAM go."},
    {"close_fd", (PyCFunction)transmitter_close_fd, METH_NOARGS, "Close the report eventfd (after close())."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef transmitter_getset[] = {
    {"fd", (getter)transmitter_fd, NULL, "The eventfd that says there is something to take.", NULL},
    {"serving", (getter)transmitter_serving, NULL, "Between start() and a stop.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject TransmitterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pyvmm.devices.virtio.net_transmitter.Transmitter",
    .tp_basicsize = sizeof(Transmitter),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "virtio-net's transmit queue sent to a frame fd by a thread without the GIL.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)transmitter_init,
    .tp_dealloc = (destructor)transmitter_dealloc,
    .tp_methods = transmitter_methods,
    .tp_getset = transmitter_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "net_transmitter",
    "virtio-net's transmit path in a thread that never takes the GIL (net_transmitter.c).",
    -1, NULL,
};

PyMODINIT_FUNC PyInit_net_transmitter(void)
{
    if (PyType_Ready(&TransmitterType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&TransmitterType);
    if (PyModule_AddObject(m, "Transmitter", (PyObject *)&TransmitterType) < 0) {
        Py_DECREF(&TransmitterType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
