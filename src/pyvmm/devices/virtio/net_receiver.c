/* virtio-net's receive path in a thread that never takes the GIL.

   Why: a software-CPU VM's threads share one host CPU (host/cpu_affinity.py). Under `iperf3 -R`
   the I/O thread's share of it (the TAP's reads, each 64 KiB frame's ~17 receive buffers taken
   off the ring and returned, in Python) was about a quarter, and the guest stood idle half the
   time waiting for its frames. Here one thread per NIC, off that CPU, reads the
   back-end's frames straight into the guest's mergeable receive buffers and publishes them in
   the used ring; Python hears about it once per burst (the I/O thread takes what was done and
   interrupts the guest) and keeps the device's policy and state: what the thread holds while it
   runs is handed back, exactly, when it stops (net.py: lend and take back).

   The thread serves only what it knows to be simple (VIRTIO_NET_F_MRG_RXBUF buffers: chains of
   device-writable direct descriptors inside guest RAM, each piece in one region); at anything
   else (a readable or indirect descriptor, a bad index, a buffer outside RAM or smaller than
   the header, a read error, the back-end's end) it stops before touching that entry and says
   why: the Python path (net.py) serves it as it always did, errors and all. A frame longer
   than the buffers it holds (the guest is short of them) is handed over half-placed.

   Receiver(fd, regions, desc_table, avail_ring, used_ring, size, event_idx, header, want, max_pieces,
            threaded=True)
     fd: the back-end's non-blocking fd, one frame (header included) per read;
     regions: guest RAM's (guest base, writable buffer) pairs, held until close();
     the queue's three ring addresses and size, whether VIRTIO_F_EVENT_IDX was negotiated;
     header: the frame header's size (num_buffers lies at offset 10); want: the bytes of
     buffers to take off the ring, where it has them, before a read (a largest frame);
     max_pieces: iovecs per read, past which no more chains join a read.
   start(last_avail, used_idx, held): serve the queue from there; `held` lists the chains the
     device holds already, [(head, [(address, length), ...]), ...], used first.
   kick(): the driver added buffers.
   stop(): return once the thread is outside its work, with (last_avail, used_idx, held, partial):
     the first three as start() takes them, partial None or, where a frame was longer than the
     buffers held, (chains, rest, length): its first `chains` held chains are full, `rest` is
     its tail, `length` its size; the queue is Python's again.
   take(): what was done since the last take: (chains, frames, bytes, dropped, used_idx, runs,
     stopped): runs are the guest ranges written, [(address, length)], stopped is None while
     it serves, else why it stopped by itself (a short text).
   pump(): without a thread (threaded=False: tests and fuzzing): serve until it would wait.
   holding: how many chains it holds now (read as the thread leaves it).
   fd: an eventfd the thread adds 1 to when it published frames since the last take, or stopped
     (take() leaves it as it is).
   close(): stop, end the thread, let the regions go; close_fd(): close the report eventfd
     (on the thread that watched it, once it stopped watching: it may be reading it).
   What it shares with the transmit thread (net_transmitter.c) is in ring_thread.h.
   Built by scripts/compile with the compiled group (pyvmm/compiled.py). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <fcntl.h>
#include <sys/uio.h>

#include "ring_thread.h"

#define NUM_BUFFERS_OFFSET 10
#define SCRATCH (65536 + 64)    /* past the buffers: a longer read is a frame too large */

typedef struct {
    uint16_t head;
    int first;                 /* index of its first piece in `pieces` */
    int count;
    uint64_t length;
} Chain;

typedef struct {
    uint64_t address;
    uint64_t length;
    char *host;
} Piece;

typedef struct {
    PyObject_HEAD
    RingThread t;
    GuestRegions ram;
    /* configuration */
    int fd;
    char *desc, *avail, *used;
    unsigned size;
    int event_idx;
    unsigned header;
    uint64_t want;
    int max_pieces;
    /* the queue while serving (the thread's own between start and stop) */
    uint16_t last_avail, used_idx;
    Chain *held;               /* a ring of `size` chains: held[(held_first + i) % size] */
    int held_first, held_count;
    Piece *pieces;             /* a ring of pieces as well, piece_ring (2 * max_pieces + 2) long */
    int pieces_first, pieces_count, piece_ring;
    uint8_t *in_held;          /* by head */
    struct iovec *iov;
    char scratch[SCRATCH];
    /* a frame read past the held buffers (the thread stopped): its first partial_chains held
       chains are full, its last partial_rest bytes are in the scratch */
    int partial_chains;
    uint64_t partial_length, partial_rest;
    /* done since the last take(), under the lock */
    uint64_t done_chains, done_frames, done_bytes, done_dropped;
    uint64_t *runs;            /* (address, length) pairs */
    Py_ssize_t nruns, runs_room;
} Receiver;

static inline uint16_t avail_idx(Receiver *r)
{
    uint16_t idx = __atomic_load_n((volatile uint16_t *)(r->avail + 2), __ATOMIC_ACQUIRE);
    return idx;
}

static Chain *held_at(Receiver *r, int i) { return &r->held[(r->held_first + i) % (int)r->size]; }
/* pieces by their place in the ring (a chain's `first` + j) */
static Piece *piece(Receiver *r, int at) { return &r->pieces[at % r->piece_ring]; }

/* Ranges written, merged with the last when adjacent (the lock held). 0 on no memory. */
static int note_run(Receiver *r, uint64_t address, uint64_t length)
{
    if (r->nruns && r->runs[2 * r->nruns - 2] + r->runs[2 * r->nruns - 1] == address) {
        r->runs[2 * r->nruns - 1] += length;
        return 1;
    }
    if (r->nruns == r->runs_room) {
        Py_ssize_t room = r->runs_room ? 2 * r->runs_room : 256;
        uint64_t *grown = realloc(r->runs, (size_t)room * 2 * sizeof(uint64_t));
        if (grown == NULL)
            return 0;
        r->runs = grown;
        r->runs_room = room;
    }
    r->runs[2 * r->nruns] = address;
    r->runs[2 * r->nruns + 1] = length;
    r->nruns++;
    return 1;
}

/* The chain at `head` appended to the held ones, or a reason it is not one to serve here. */
static const char *walk(Receiver *r, uint16_t head)
{
    unsigned index = head, seen = 0;
    int first = (r->pieces_first + r->pieces_count) % r->piece_ring, count = 0;
    uint64_t length = 0;
    for (;;) {
        if (++seen > r->size)
            return "a descriptor chain loops";
        Descriptor d = descriptor_at(r->desc, index);
        if (d.flags & DESC_F_INDIRECT)
            return "an indirect descriptor";
        if (d.length) {
            if (!(d.flags & DESC_F_WRITE))
                return "a device-readable descriptor";
            char *host = regions_translate(&r->ram, d.address, d.length);
            if (host == NULL)
                return "a buffer outside guest RAM's regions";
            if (count >= r->max_pieces || r->pieces_count + count >= r->piece_ring)
                return "a chain of too many pieces";
            Piece *p = piece(r, first + count);
            p->address = d.address;
            p->length = d.length;
            p->host = host;
            count++;
            length += d.length;
        }
        if (!(d.flags & DESC_F_NEXT))
            break;
        if (d.next >= r->size)
            return "a next index outside the table";
        index = d.next;
    }
    if (length < r->header)
        return "a buffer smaller than the frame header";
    Chain *c = held_at(r, r->held_count);
    c->head = head;
    c->first = first;
    c->count = count;
    c->length = length;
    r->held_count++;
    r->pieces_count += count;
    r->in_held[head] = 1;
    return NULL;
}

static void drop_first_chains(Receiver *r, int count)
{
    for (int i = 0; i < count; i++) {
        Chain *c = held_at(r, 0);
        r->in_held[c->head] = 0;
        r->pieces_first = (r->pieces_first + c->count) % r->piece_ring;
        r->pieces_count -= c->count;
        r->held_first = (r->held_first + 1) % (int)r->size;
        r->held_count--;
    }
}

/* Take chains until `want` bytes or the read's pieces are held, or none is left; a reason where
   one cannot be taken (it stays in the ring, for Python). */
static const char *fill(Receiver *r, uint64_t held_bytes)
{
    while (held_bytes < r->want && r->held_count < (int)r->size && r->pieces_count < r->max_pieces) {
        uint16_t pending = (uint16_t)(avail_idx(r) - r->last_avail);
        if (pending > r->size)
            return "the available index moved past the ring";
        if (pending == 0)
            break;
        uint16_t head = load16(r->avail + 4 + 2 * (r->last_avail % r->size));
        if (head >= r->size || r->in_held[head])
            return "a bad head in the available ring";
        const char *why = walk(r, head);
        if (why != NULL)
            return why;
        r->last_avail++;
        held_bytes += held_at(r, r->held_count - 1)->length;
    }
    return NULL;
}

/* A frame of n bytes lies in the first held chains: publish them. 0 on no memory. */
static int publish(Receiver *r, uint64_t n)
{
    int count = 0;
    uint64_t placed = 0;
    while (placed < n) {
        placed += held_at(r, count)->length;
        count++;
    }
    /* num_buffers, which the back-end left out: the header may be split over pieces */
    Chain *first = held_at(r, 0);
    unsigned char value[2] = {(unsigned char)count, (unsigned char)(count >> 8)};
    uint64_t offset = NUM_BUFFERS_OFFSET;
    for (int j = 0, k = 0; j < first->count && k < 2; j++) {
        Piece *p = piece(r, first->first + j);
        while (k < 2 && offset < p->length)
            p->host[offset++] = (char)value[k++];
        if (k < 2)
            offset -= p->length;
    }
    pthread_mutex_lock(&r->t.lock);
    uint64_t left = n;
    int ok = 1;
    for (int i = 0; i < count; i++) {
        Chain *c = held_at(r, i);
        uint64_t written = left < c->length ? left : c->length;
        char *element = r->used + 4 + 8 * (size_t)(r->used_idx % r->size);
        store32(element, c->head);
        store32(element + 4, (uint32_t)written);
        r->used_idx++;
        for (int j = 0; j < c->count && left; j++) {
            Piece *p = piece(r, c->first + j);
            uint64_t part = left < p->length ? left : p->length;
            ok = note_run(r, p->address, part) && ok;
            left -= part;
        }
    }
    __atomic_store_n((volatile uint16_t *)(r->used + 2), r->used_idx, __ATOMIC_RELEASE);
    r->done_chains += (uint64_t)count;
    r->done_frames++;
    r->done_bytes += n - r->header;
    pthread_mutex_unlock(&r->t.lock);
    drop_first_chains(r, count);
    return ok;
}

static void ask_for_kick(Receiver *r)
{
    store16(r->used + 4 + 8 * r->size, r->last_avail);
}

/* One step: take buffers, read a frame. What to wait for next, or STOPPED with r->stopped set. */
static int step(Receiver *r)
{
    uint64_t held_bytes = 0;
    for (int i = 0; i < r->held_count; i++)
        held_bytes += held_at(r, i)->length;
    const char *why = fill(r, held_bytes);
    if (why != NULL) {
        r->t.stopped = why;
        return RING_STOPPED;
    }
    /* the read: the first held chains whose pieces fit it, then the scratch */
    int chains = 0, count = 0;
    uint64_t covered = 0;
    for (; chains < r->held_count; chains++) {
        Chain *c = held_at(r, chains);
        if (covered >= r->want || count + c->count > r->max_pieces)
            break;
        for (int j = 0; j < c->count; j++) {
            Piece *p = piece(r, c->first + j);
            r->iov[count].iov_base = p->host;
            r->iov[count].iov_len = p->length;
            count++;
        }
        covered += c->length;
    }
    if (!chains) {
        /* Only now ask for a kick at the next entry (EVENT_IDX's avail_event): while buffers are
           held, the next frame's step looks at the ring anyway, so the driver's adds need no
           kick (each is an exit and a wake-up). Then look again: one added meanwhile came without. */
        if (r->event_idx)
            ask_for_kick(r);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        return avail_idx(r) != r->last_avail ? RING_SERVED : RING_WAIT_KICK;
    }
    /* (fewer than a largest frame's buffers: read anyway, as most frames are small) */
    r->iov[count].iov_base = r->scratch;
    r->iov[count].iov_len = SCRATCH;
    ssize_t n = readv(r->fd, r->iov, count + 1);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return RING_WAIT_FD;
        r->t.stopped = "the back-end's read failed";
        return RING_STOPPED;
    }
    if (n == 0) {
        r->t.stopped = "the back-end ended";
        return RING_STOPPED;
    }
    if ((uint64_t)n > covered && covered < r->want && (uint64_t)n - covered <= SCRATCH - 1) {
        /* the frame's tail is in the scratch: Python places it once the guest adds buffers */
        r->partial_chains = chains;
        r->partial_length = (uint64_t)n;
        r->partial_rest = (uint64_t)n - covered;
        r->t.stopped = "a frame larger than the buffers held";
        return RING_STOPPED;
    }
    if ((uint64_t)n < r->header || (uint64_t)n > covered) {
        pthread_mutex_lock(&r->t.lock);
        r->done_dropped++;  /* shorter than its header, or longer than a largest frame */
        pthread_mutex_unlock(&r->t.lock);
        return RING_SERVED;
    }
    if (!publish(r, (uint64_t)n)) {
        r->t.stopped = "no memory for the written ranges";
        return RING_STOPPED;
    }
    return RING_SERVED;
}

/* Serve until there is nothing to do without waiting; the wait that follows (or RING_STOPPED). */
static int serve(void *self)
{
    Receiver *r = self;
    int next;
    while ((next = step(r)) == RING_SERVED) {
        pthread_mutex_lock(&r->t.lock);
        int stop = r->t.stop_wanted;
        if (r->done_frames)
            ring_thread_report(&r->t);
        pthread_mutex_unlock(&r->t.lock);
        if (stop)
            return RING_SERVED;
    }
    pthread_mutex_lock(&r->t.lock);
    int done = r->done_frames != 0;
    pthread_mutex_unlock(&r->t.lock);
    ring_thread_finish(&r->t, next, done);
    return next;
}

static void *run(void *arg)
{
    Receiver *r = arg;
    /* a frame, or (with no buffers) only a kick: the back-end stays readable meanwhile */
    ring_thread_loop(&r->t, "vmm-net-rx", r->fd, serve, r);
    return NULL;
}

/* ---- Python side -------------------------------------------------------------------------- */

static void release(Receiver *r)
{
    regions_release(&r->ram);
    free(r->held);
    free(r->pieces);
    free(r->in_held);
    free(r->iov);
    free(r->runs);
    r->held = NULL;
    r->pieces = NULL;
    r->in_held = NULL;
    r->iov = NULL;
    r->runs = NULL;
}

static int receiver_init(Receiver *r, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"fd", "regions", "desc_table", "avail_ring", "used_ring", "size", "event_idx", "header",
                            "want", "max_pieces", "threaded", NULL};
    PyObject *regions;
    unsigned long long desc_table, avail_ring, used_ring, want;
    unsigned size, header;
    int fd, event_idx, max_pieces, threaded = 1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iOKKKIpIKi|p:Receiver", names, &fd, &regions, &desc_table,
                                     &avail_ring, &used_ring, &size, &event_idx, &header, &want, &max_pieces,
                                     &threaded))
        return -1;
    if (r->t.initialised || r->t.closed) {
        PyErr_SetString(PyExc_RuntimeError, "Receiver: already set up");
        return -1;
    }
    if (fd < 0 || !size || size > MAX_QUEUE || (size & (size - 1)) || header < NUM_BUFFERS_OFFSET + 2 ||
        header > 4096 || !want || want > (1ULL << 24) || max_pieces < 1 || max_pieces > 1023) {
        PyErr_Format(PyExc_ValueError, "Receiver: fd %d, size %u, header %u, want %llu, max_pieces %d", fd, size,
                     header, want, max_pieces);
        return -1;
    }
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || !(flags & O_NONBLOCK)) {
        PyErr_Format(PyExc_ValueError, "Receiver: fd %d is not a non-blocking fd (a read would hold the thread)", fd);
        return -1;
    }
    r->t.wake = r->t.report = -1;
    if (regions_hold(&r->ram, regions, "Receiver") < 0)
        goto fail;
    r->size = size;
    r->event_idx = event_idx;
    r->header = header;
    r->want = want;
    r->max_pieces = max_pieces;
    r->fd = fd;
    if (!ring_host(&r->ram, desc_table, 16ULL * size, &r->desc, "Receiver", "descriptor table") ||
        !ring_host(&r->ram, avail_ring, 6ULL + 2ULL * size, &r->avail, "Receiver", "available ring") ||
        !ring_host(&r->ram, used_ring, 6ULL + 8ULL * size, &r->used, "Receiver", "used ring"))
        goto fail;
    r->piece_ring = 2 * max_pieces + 2;
    r->held = calloc(size, sizeof(Chain));
    r->pieces = calloc((size_t)r->piece_ring, sizeof(Piece));
    r->in_held = calloc(size, 1);
    r->iov = calloc((size_t)max_pieces + 1, sizeof(struct iovec));
    if (r->held == NULL || r->pieces == NULL || r->in_held == NULL || r->iov == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    if (ring_thread_open(&r->t, threaded, run, r) < 0)
        goto fail;
    return 0;

fail:
    release(r);
    return -1;
}

static PyObject *receiver_start(Receiver *r, PyObject *args)
{
    unsigned last_avail, used_idx;
    PyObject *held;
    if (!PyArg_ParseTuple(args, "IIO:start", &last_avail, &used_idx, &held) ||
        !ring_thread_usable(&r->t, "Receiver"))
        return NULL;
    if (ring_thread_engaged(&r->t)) {
        PyErr_SetString(PyExc_RuntimeError, "Receiver: serving already (stop() first)");
        return NULL;
    }
    if (last_avail > 0xFFFF || used_idx > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "Receiver.start: ring indices are 16-bit");
        return NULL;
    }
    PyObject *list = PySequence_Fast(held, "Receiver.start: held is not a sequence");
    if (list == NULL)
        return NULL;
    r->held_first = r->held_count = r->pieces_first = r->pieces_count = 0;
    memset(r->in_held, 0, r->size);
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(list); i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(list, i), *pieces;
        unsigned head;
        if (!PyArg_ParseTuple(item, "IO:a held chain", &head, &pieces))
            goto fail;
        if (head >= r->size || r->in_held[head] || r->held_count >= (int)r->size) {
            PyErr_Format(PyExc_ValueError, "Receiver.start: held chain %u on a queue of %u (or held twice)", head,
                         r->size);
            goto fail;
        }
        PyObject *plist = PySequence_Fast(pieces, "Receiver.start: a chain's pieces are not a sequence");
        if (plist == NULL)
            goto fail;
        Chain *c = held_at(r, r->held_count);
        c->head = (uint16_t)head;
        c->first = (r->pieces_first + r->pieces_count) % r->piece_ring;
        c->count = 0;
        c->length = 0;
        for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(plist); j++) {
            unsigned long long address, length;
            if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(plist, j), "KK:a piece", &address, &length)) {
                Py_DECREF(plist);
                goto fail;
            }
            char *host = regions_translate(&r->ram, address, length);
            if (host == NULL || r->pieces_count >= r->piece_ring) {
                Py_DECREF(plist);
                PyErr_Format(PyExc_ValueError, "Receiver.start: piece %#llx+%#llx cannot be held", address, length);
                goto fail;
            }
            Piece *p = piece(r, r->pieces_first + r->pieces_count);
            p->address = address;
            p->length = length;
            p->host = host;
            r->pieces_count++;
            c->count++;
            c->length += length;
        }
        Py_DECREF(plist);
        r->in_held[head] = 1;
        r->held_count++;
    }
    Py_DECREF(list);
    r->last_avail = (uint16_t)last_avail;
    r->used_idx = (uint16_t)used_idx;
    r->partial_chains = 0;
    ring_thread_begin(&r->t);
    Py_RETURN_NONE;

fail:
    Py_DECREF(list);
    r->held_first = r->held_count = r->pieces_first = r->pieces_count = 0;
    memset(r->in_held, 0, r->size);
    return NULL;
}

static PyObject *receiver_kick(Receiver *r, PyObject *unused)
{
    if (!ring_thread_usable(&r->t, "Receiver"))
        return NULL;
    signal_fd(r->t.wake);
    Py_RETURN_NONE;
}

static PyObject *receiver_stop(Receiver *r, PyObject *unused)
{
    if (!ring_thread_usable(&r->t, "Receiver"))
        return NULL;
    ring_thread_stop(&r->t);
    if (r->event_idx)
        ask_for_kick(r);  /* the I/O thread's driver kicks again at its next add (and it lends again) */
    PyObject *held = PyList_New(r->held_count);
    if (held == NULL)
        return NULL;
    for (int i = 0; i < r->held_count; i++) {
        Chain *c = held_at(r, i);
        PyObject *pieces = PyList_New(c->count);
        if (pieces == NULL) {
            Py_DECREF(held);
            return NULL;
        }
        for (int j = 0; j < c->count; j++) {
            Piece *p = piece(r, c->first + j);
            PyList_SET_ITEM(pieces, j, Py_BuildValue("(KK)", (unsigned long long)p->address,
                                                     (unsigned long long)p->length));
        }
        PyList_SET_ITEM(held, i, Py_BuildValue("(IN)", (unsigned)c->head, pieces));
    }
    PyObject *partial = Py_None;
    if (r->partial_chains) {
        partial = Py_BuildValue("(iy#K)", r->partial_chains, r->scratch, (Py_ssize_t)r->partial_rest,
                                (unsigned long long)r->partial_length);
        if (partial == NULL) {
            Py_DECREF(held);
            return NULL;
        }
        r->partial_chains = 0;
    } else {
        Py_INCREF(partial);
    }
    return Py_BuildValue("(IINN)", (unsigned)r->last_avail, (unsigned)r->used_idx, held, partial);
}

static PyObject *receiver_take(Receiver *r, PyObject *unused)
{
    if (!r->t.initialised)
        return Py_BuildValue("(iiiiiOO)", 0, 0, 0, 0, 0, Py_None, Py_None);
    /* (the report eventfd is the I/O thread's to reset: it interrupts the guest for what is taken
       here by another thread too, and serves a stop) */
    pthread_mutex_lock(&r->t.lock);
    uint64_t chains = r->done_chains, frames = r->done_frames, bytes = r->done_bytes, dropped = r->done_dropped;
    unsigned used_idx = r->used_idx;
    const char *stopped = ring_thread_taken(&r->t);
    uint64_t *runs = r->runs;
    Py_ssize_t nruns = r->nruns;
    r->runs = NULL;
    r->nruns = r->runs_room = 0;
    r->done_chains = r->done_frames = r->done_bytes = r->done_dropped = 0;
    pthread_mutex_unlock(&r->t.lock);
    PyObject *list = PyList_New(nruns);
    for (Py_ssize_t i = 0; list != NULL && i < nruns; i++) {
        PyObject *run = Py_BuildValue("(KK)", (unsigned long long)runs[2 * i], (unsigned long long)runs[2 * i + 1]);
        if (run == NULL)
            Py_CLEAR(list);
        else
            PyList_SET_ITEM(list, i, run);
    }
    free(runs);
    if (list == NULL)
        return NULL;
    if (stopped == NULL)
        return Py_BuildValue("(KKKKINO)", chains, frames, bytes, dropped, used_idx, list, Py_None);
    return Py_BuildValue("(KKKKINs)", chains, frames, bytes, dropped, used_idx, list, stopped);
}

static PyObject *receiver_pump(Receiver *r, PyObject *unused)
{
    if (!ring_thread_usable(&r->t, "Receiver"))
        return NULL;
    if (r->t.threaded) {
        PyErr_SetString(PyExc_RuntimeError, "Receiver.pump: a threaded receiver serves on its thread");
        return NULL;
    }
    if (ring_thread_serving(&r->t))
        serve(r);  /* (a stop by itself clears `serving` there) */
    Py_RETURN_NONE;
}

static PyObject *receiver_close(Receiver *r, PyObject *unused)
{
    if (r->t.initialised && !r->t.closed) {
        ring_thread_close(&r->t);
        release(r);
    }
    Py_RETURN_NONE;
}

static PyObject *receiver_close_fd(Receiver *r, PyObject *unused)
{
    ring_thread_close_report(&r->t);
    Py_RETURN_NONE;
}

static PyObject *receiver_fd(Receiver *r, void *closure)
{
    return PyLong_FromLong(r->t.initialised ? r->t.report : -1);
}

static PyObject *receiver_serving(Receiver *r, void *closure)
{
    return PyBool_FromLong(ring_thread_serving(&r->t));
}

static PyObject *receiver_holding(Receiver *r, void *closure)
{
    /* (the thread's own count, read as it is: for tests and stats, not for decisions) */
    return PyLong_FromLong(r->t.initialised && !r->t.closed ? __atomic_load_n(&r->held_count, __ATOMIC_RELAXED) : 0);
}

static void receiver_dealloc(Receiver *r)
{
    ring_thread_destroy(&r->t);
    release(r);  /* (once the thread ended: it reads the regions until then) */
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyMethodDef receiver_methods[] = {
    {"start", (PyCFunction)receiver_start, METH_VARARGS, "Serve the queue: (last_avail, used_idx, held)."},
    {"kick", (PyCFunction)receiver_kick, METH_NOARGS, "The driver added receive buffers."},
    {"stop", (PyCFunction)receiver_stop, METH_NOARGS, "Stop serving: (last_avail, used_idx, held)."},
    {"take", (PyCFunction)receiver_take, METH_NOARGS,
     "Done since the last take: (chains, frames, bytes, dropped, used_idx, runs, stopped)."},
    {"pump", (PyCFunction)receiver_pump, METH_NOARGS, "Without a thread: serve until it would wait."},
    {"close", (PyCFunction)receiver_close, METH_NOARGS, "Stop, end the thread, let guest RAM go."},
    {"close_fd", (PyCFunction)receiver_close_fd, METH_NOARGS, "Close the report eventfd (after close())."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef receiver_getset[] = {
    {"fd", (getter)receiver_fd, NULL, "The eventfd that says there is something to take.", NULL},
    {"serving", (getter)receiver_serving, NULL, "Between start() and a stop.", NULL},
    {"holding", (getter)receiver_holding, NULL, "How many chains the thread holds now.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ReceiverType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pyvmm.devices.virtio.net_receiver.Receiver",
    .tp_basicsize = sizeof(Receiver),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "virtio-net's mergeable receive buffers filled from a frame fd by a thread without the GIL.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)receiver_init,
    .tp_dealloc = (destructor)receiver_dealloc,
    .tp_methods = receiver_methods,
    .tp_getset = receiver_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "net_receiver",
    "virtio-net's receive path in a thread that never takes the GIL (net_receiver.c).",
    -1, NULL,
};

PyMODINIT_FUNC PyInit_net_receiver(void)
{
    if (PyType_Ready(&ReceiverType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ReceiverType);
    if (PyModule_AddObject(m, "Receiver", (PyObject *)&ReceiverType) < 0) {
        Py_DECREF(&ReceiverType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
