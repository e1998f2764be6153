/* Disk transfers moved by threads that never take the GIL.

   A software-CPU VM's threads share one host CPU (host/cpu_affinity.py), so a large read served
   where it was kicked copies its data from the page cache while the guest stands still. These
   threads run where the kernel puts them (they inherit the creating thread's placement: the
   builder's, which is none) and move a request's data with preadv/pwritev between the image and
   guest RAM; Python only starts a transfer and collects it (host/disk_transfers.py).

   Transfers(threads): the threads start at once, with every signal blocked.
   start(token, writing, fd, offset, regions, pieces, skip, length): queue a transfer of bytes
     [skip, skip + length) of `pieces`, a sequence of (guest address, size), each inside one of
     guest RAM's `regions`, (guest base, buffer) pairs: the buffers (writable ones when reading
     from the file) are held until the transfer is taken, so RAM cannot be unmapped meanwhile. It
     moves every byte or fails: a short transfer goes on from where it stopped, the file's end
     before the last byte is EIO.
   take(): the transfers whose data has moved, as (token, errno or 0), in the order they ended;
     their buffers let go.
   fd: an eventfd the threads add 1 to for each transfer that ended (the caller resets it before
     take(), so none is missed).
   wait_idle(timeout=None): wait, without the GIL, until no transfer's data moves; False when
     `timeout` seconds passed first.
   moving: transfers started whose data has not finished moving.
   close(): wait for the transfers started, end the threads, let every buffer go and close the
     eventfd; start() refuses after it.
   Built by scripts/compile with the compiled group (pyvmm/compiled.py); without a build a disk
   serves every request where it was kicked. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAX_THREADS 64

typedef struct Job {
    struct Job *next;
    PyObject *token;      /* touched only with the GIL */
    int fd, writing, error;
    off_t offset;
    struct iovec *iov;
    int iovcnt;
    Py_buffer *views;
    Py_ssize_t nviews;
} Job;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t lock;
    pthread_cond_t work, idle;
    int initialised;
    Job *pending, *pending_tail;  /* waiting for a thread */
    Job *ended, *ended_tail;      /* data moved (or failed), waiting for take() */
    long moving;                  /* pending plus being moved */
    int stopping, closed;
    int nthreads;
    pthread_t threads[MAX_THREADS];
    int event;
} Transfers;

static void free_job(Job *job)
{
    for (Py_ssize_t i = 0; i < job->nviews; i++)
        PyBuffer_Release(&job->views[i]);
    Py_XDECREF(job->token);
    PyMem_RawFree(job->views);
    PyMem_RawFree(job->iov);
    PyMem_RawFree(job);
}

/* A job at the end of a list (the lock held). */
static void append(Job **head, Job **tail, Job *job)
{
    job->next = NULL;
    if (*tail)
        (*tail)->next = job;
    else
        *head = job;
    *tail = job;
}

/* Every byte of the job, or an errno. */
static int move(Job *job)
{
    struct iovec *iov = job->iov;
    int left = job->iovcnt;
    off_t offset = job->offset;
    while (left > 0 && iov->iov_len == 0) {
        iov++;
        left--;
    }
    while (left > 0) {
        int count = left < IOV_MAX ? left : IOV_MAX;
        ssize_t done = job->writing ? pwritev(job->fd, iov, count, offset) : preadv(job->fd, iov, count, offset);
        if (done < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (done == 0)
            return EIO;  /* the image ended early (truncated meanwhile) */
        offset += done;
        while (left > 0 && (size_t)done >= iov->iov_len) {
            done -= (ssize_t)iov->iov_len;
            iov++;
            left--;
        }
        if (done > 0) {
            iov->iov_base = (char *)iov->iov_base + done;
            iov->iov_len -= (size_t)done;
        }
    }
    return 0;
}

static void *serve(void *arg)
{
    Transfers *t = arg;
    pthread_mutex_lock(&t->lock);
    for (;;) {
        while (t->pending == NULL && !t->stopping)
            pthread_cond_wait(&t->work, &t->lock);
        Job *job = t->pending;
        if (job == NULL)
            break;  /* stopping, nothing left */
        t->pending = job->next;
        if (t->pending == NULL)
            t->pending_tail = NULL;
        pthread_mutex_unlock(&t->lock);

        job->error = move(job);

        pthread_mutex_lock(&t->lock);
        append(&t->ended, &t->ended_tail, job);
        if (--t->moving == 0)
            pthread_cond_broadcast(&t->idle);
        uint64_t one = 1;
        if (write(t->event, &one, sizeof one) < 0) {
            /* (an eventfd's counter does not fill up: at most one add per transfer) */
        }
    }
    pthread_mutex_unlock(&t->lock);
    return NULL;
}

/* The host address of guest [address, address + size), which must lie in one region, or NULL. */
static char *translate(Py_buffer *regions, uint64_t *bases, Py_ssize_t count, uint64_t address, uint64_t size)
{
    for (Py_ssize_t i = 0; i < count; i++) {
        uint64_t length = (uint64_t)regions[i].len;
        if (address >= bases[i] && address - bases[i] <= length && size <= length - (address - bases[i]))
            return (char *)regions[i].buf + (address - bases[i]);
    }
    return NULL;
}

/* A region's or a piece's first field, and its second, a size when `size` is not NULL (direct:
   PyArg_ParseTuple's format parsing cost more than the rest of start() for a 1 MiB request). */
static int pair(PyObject *item, const char *what, unsigned long long *first, unsigned long long *size,
                PyObject **object)
{
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
        PyErr_Format(PyExc_TypeError, "Transfers.start: %s, not %.100s", what, Py_TYPE(item)->tp_name);
        return 0;
    }
    *first = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(item, 0));
    if (*first == (unsigned long long)-1 && PyErr_Occurred())
        return 0;
    if (size == NULL) {
        *object = PyTuple_GET_ITEM(item, 1);
        return 1;
    }
    *size = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(item, 1));
    return !(*size == (unsigned long long)-1 && PyErr_Occurred());
}

static PyObject *transfers_start(Transfers *t, PyObject *args)
{
    PyObject *token, *regions, *pieces;
    int writing, fd;
    long long offset, skip, length;
    if (!PyArg_ParseTuple(args, "OpiLOOLL:start", &token, &writing, &fd, &offset, &regions, &pieces, &skip, &length))
        return NULL;
    if (!t->initialised || t->closed) {
        PyErr_SetString(PyExc_RuntimeError, "Transfers: closed");
        return NULL;
    }
    if (fd < 0 || offset < 0 || skip < 0 || length < 0) {
        PyErr_Format(PyExc_ValueError, "Transfers: fd %d, offset %lld, skip %lld, length %lld", fd, offset, skip,
                     length);
        return NULL;
    }
    PyObject *region_list = PySequence_Fast(regions, "Transfers.start: regions is not a sequence");
    if (region_list == NULL)
        return NULL;
    PyObject *piece_list = PySequence_Fast(pieces, "Transfers.start: pieces is not a sequence");
    if (piece_list == NULL) {
        Py_DECREF(region_list);
        return NULL;
    }
    Py_ssize_t nregions = PySequence_Fast_GET_SIZE(region_list), npieces = PySequence_Fast_GET_SIZE(piece_list);
    Job *job = NULL;
    uint64_t *bases = PyMem_Calloc(nregions ? nregions : 1, sizeof(uint64_t));
    if (npieces > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "Transfers.start: too many pieces");
        goto fail;
    }
    job = PyMem_RawCalloc(1, sizeof(Job));
    if (job != NULL) {
        job->views = PyMem_RawCalloc(nregions ? nregions : 1, sizeof(Py_buffer));
        job->iov = PyMem_RawCalloc(npieces ? npieces : 1, sizeof(struct iovec));
    }
    if (bases == NULL || job == NULL || job->views == NULL || job->iov == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    /* Guest RAM's regions, held until the transfer is taken: their mappings cannot go meanwhile. */
    int flags = writing ? PyBUF_SIMPLE : PyBUF_WRITABLE;  /* reading from the file writes guest RAM */
    for (Py_ssize_t i = 0; i < nregions; i++) {
        unsigned long long base;
        PyObject *buffer;
        if (!pair(PySequence_Fast_GET_ITEM(region_list, i), "a region is (guest base, buffer)", &base, NULL, &buffer))
            goto fail;
        if (PyObject_GetBuffer(buffer, &job->views[i], flags) < 0)
            goto fail;
        job->nviews = i + 1;
        bases[i] = base;
    }
    /* Bytes [skip, skip + length) of the pieces (guest address, size), as host iovecs. */
    uint64_t to_skip = (uint64_t)skip, wanted = (uint64_t)length;
    int count = 0;
    for (Py_ssize_t i = 0; i < npieces && wanted > 0; i++) {
        unsigned long long address, size;
        if (!pair(PySequence_Fast_GET_ITEM(piece_list, i), "a piece is (guest address, size)", &address, &size, NULL))
            goto fail;
        if (to_skip >= size) {
            to_skip -= size;
            continue;
        }
        uint64_t take = size - to_skip < wanted ? size - to_skip : wanted;
        if (address + to_skip < address) {
            PyErr_SetString(PyExc_ValueError, "Transfers.start: a piece wraps around");
            goto fail;
        }
        char *host = translate(job->views, bases, nregions, address + to_skip, take);
        if (host == NULL) {
            PyErr_Format(PyExc_ValueError, "Transfers.start: guest %#llx+%#llx is not inside one region",
                         (unsigned long long)(address + to_skip), (unsigned long long)take);
            goto fail;
        }
        job->iov[count].iov_base = host;
        job->iov[count].iov_len = (size_t)take;
        count++;
        wanted -= take;
        to_skip = 0;
    }
    if (wanted > 0) {
        PyErr_Format(PyExc_ValueError, "Transfers.start: the pieces hold %lld bytes fewer than asked",
                     (long long)wanted);
        goto fail;
    }
    Py_DECREF(region_list);
    Py_DECREF(piece_list);
    PyMem_Free(bases);
    Py_INCREF(token);
    job->token = token;
    job->fd = fd;
    job->writing = writing;
    job->offset = (off_t)offset;
    job->iovcnt = count;

    pthread_mutex_lock(&t->lock);
    append(&t->pending, &t->pending_tail, job);
    t->moving++;
    pthread_cond_signal(&t->work);
    pthread_mutex_unlock(&t->lock);
    Py_RETURN_NONE;

fail:
    if (job != NULL)
        free_job(job);
    PyMem_Free(bases);
    Py_DECREF(region_list);
    Py_DECREF(piece_list);
    return NULL;
}

static PyObject *transfers_take(Transfers *t, PyObject *unused)
{
    if (!t->initialised)
        return PyList_New(0);
    pthread_mutex_lock(&t->lock);
    Job *job = t->ended;
    t->ended = t->ended_tail = NULL;
    pthread_mutex_unlock(&t->lock);
    PyObject *taken = PyList_New(0);
    while (job != NULL) {
        Job *next = job->next;
        if (taken != NULL) {
            PyObject *entry = Py_BuildValue("(Oi)", job->token, job->error);
            if (entry == NULL || PyList_Append(taken, entry) < 0)
                Py_CLEAR(taken);
            Py_XDECREF(entry);
        }
        free_job(job);  /* (on an error above the rest are let go too: nothing is left half-taken) */
        job = next;
    }
    return taken;
}

/* Wait until nothing moves: 1, or 0 when `seconds` (negative: no limit) passed first. */
static int wait_for_idle(Transfers *t, double seconds)
{
    struct timespec deadline;
    if (seconds >= 0) {
        clock_gettime(CLOCK_REALTIME, &deadline);
        double whole = (double)(time_t)seconds;
        deadline.tv_sec += (time_t)seconds;
        deadline.tv_nsec += (long)((seconds - whole) * 1e9);
        if (deadline.tv_nsec >= 1000000000L) {
            deadline.tv_sec++;
            deadline.tv_nsec -= 1000000000L;
        }
    }
    int idle;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&t->lock);
    while (t->moving > 0) {
        if (seconds < 0)
            pthread_cond_wait(&t->idle, &t->lock);
        else if (pthread_cond_timedwait(&t->idle, &t->lock, &deadline) == ETIMEDOUT)
            break;
    }
    idle = t->moving == 0;
    pthread_mutex_unlock(&t->lock);
    Py_END_ALLOW_THREADS
    return idle;
}

static PyObject *transfers_wait_idle(Transfers *t, PyObject *args)
{
    PyObject *timeout = Py_None;
    if (!PyArg_ParseTuple(args, "|O:wait_idle", &timeout))
        return NULL;
    double seconds = -1;
    if (timeout != Py_None) {
        seconds = PyFloat_AsDouble(timeout);
        if (seconds == -1 && PyErr_Occurred())
            return NULL;
        if (seconds < 0 || seconds != seconds) {
            PyErr_SetString(PyExc_ValueError, "Transfers.wait_idle: a timeout of 0 seconds or more");
            return NULL;
        }
    }
    if (!t->initialised)
        Py_RETURN_TRUE;
    return PyBool_FromLong(wait_for_idle(t, seconds));
}

static void shut_down(Transfers *t)
{
    if (!t->initialised || t->closed)
        return;
    t->closed = 1;  /* start() refuses from here (it runs with the GIL, as this does) */
    wait_for_idle(t, -1);
    pthread_mutex_lock(&t->lock);
    t->stopping = 1;
    pthread_cond_broadcast(&t->work);
    pthread_mutex_unlock(&t->lock);
    Py_BEGIN_ALLOW_THREADS
    for (int i = 0; i < t->nthreads; i++)
        pthread_join(t->threads[i], NULL);
    Py_END_ALLOW_THREADS
    t->nthreads = 0;
    close(t->event);
    t->event = -1;
    Job *job = t->ended;
    t->ended = t->ended_tail = NULL;
    while (job != NULL) {
        Job *next = job->next;
        free_job(job);
        job = next;
    }
}

static PyObject *transfers_close(Transfers *t, PyObject *unused)
{
    shut_down(t);
    Py_RETURN_NONE;
}

static PyObject *transfers_moving(Transfers *t, void *closure)
{
    if (!t->initialised)
        return PyLong_FromLong(0);
    pthread_mutex_lock(&t->lock);
    long moving = t->moving;
    pthread_mutex_unlock(&t->lock);
    return PyLong_FromLong(moving);
}

static PyObject *transfers_fd(Transfers *t, void *closure)
{
    return PyLong_FromLong(t->event);
}

static int transfers_init(Transfers *t, PyObject *args, PyObject *kwargs)
{
    int threads;
    if (!PyArg_ParseTuple(args, "i:Transfers", &threads))
        return -1;
    if (t->initialised) {
        PyErr_SetString(PyExc_RuntimeError, "Transfers: already started");
        return -1;
    }
    if (threads < 1 || threads > MAX_THREADS) {
        PyErr_Format(PyExc_ValueError, "Transfers: %d threads (1 to %d)", threads, MAX_THREADS);
        return -1;
    }
    t->event = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (t->event < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    pthread_mutex_init(&t->lock, NULL);
    pthread_cond_init(&t->work, NULL);
    pthread_cond_init(&t->idle, NULL);
    t->initialised = 1;
    /* The threads start with every signal blocked: the process's signals go to its Python threads. */
    sigset_t all, before;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &before);
    int failed = 0;
    for (int i = 0; i < threads && !failed; i++) {
        failed = pthread_create(&t->threads[i], NULL, serve, t);
        if (!failed) {
            char name[16];
            snprintf(name, sizeof name, "pyvmm-xfer-%d", i);
            pthread_setname_np(t->threads[i], name);
            t->nthreads++;
        }
    }
    pthread_sigmask(SIG_SETMASK, &before, NULL);
    if (failed) {
        shut_down(t);
        errno = failed;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static PyObject *transfers_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    Transfers *t = (Transfers *)type->tp_alloc(type, 0);
    if (t != NULL)
        t->event = -1;
    return (PyObject *)t;
}

static void transfers_dealloc(Transfers *t)
{
    shut_down(t);
    if (t->initialised) {
        pthread_mutex_destroy(&t->lock);
        pthread_cond_destroy(&t->work);
        pthread_cond_destroy(&t->idle);
    }
    if (t->event >= 0)
        close(t->event);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyMethodDef transfers_methods[] = {
    {"start", (PyCFunction)transfers_start, METH_VARARGS, "Queue a transfer: (token, writing, fd, offset, regions, pieces, skip, length)."},
    {"take", (PyCFunction)transfers_take, METH_NOARGS, "The ended transfers: [(token, errno or 0)]."},
    {"wait_idle", (PyCFunction)transfers_wait_idle, METH_VARARGS, "Wait until no data moves; False on timeout."},
    {"close", (PyCFunction)transfers_close, METH_NOARGS, "Finish what was started, end the threads."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef transfers_getset[] = {
    {"moving", (getter)transfers_moving, NULL, "transfers whose data has not finished moving", NULL},
    {"fd", (getter)transfers_fd, NULL, "the eventfd counting ended transfers", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject TransfersType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pyvmm.host.transfer_threads.Transfers",
    .tp_basicsize = sizeof(Transfers),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Threads without the GIL moving disk data between files and buffers.",
    .tp_new = transfers_new,
    .tp_init = (initproc)transfers_init,
    .tp_dealloc = (destructor)transfers_dealloc,
    .tp_methods = transfers_methods,
    .tp_getset = transfers_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "transfer_threads",
    "Disk transfers moved by threads that never take the GIL (transfer_threads.c).",
    -1, NULL,
};

PyMODINIT_FUNC PyInit_transfer_threads(void)
{
    if (PyType_Ready(&TransfersType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&TransfersType);
    if (PyModule_AddObject(m, "Transfers", (PyObject *)&TransfersType) < 0) {
        Py_DECREF(&TransfersType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
