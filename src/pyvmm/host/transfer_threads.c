/* Disk transfers moved by threads that never take the GIL.

   A software-CPU VM's threads share one host CPU (host/cpu_affinity.py), so a large read served
   where it was kicked copies its data from the page cache while the guest stands still. These
   threads run where the kernel puts them (they inherit the creating thread's placement: the
   builder's, which is none) and move a request's data with preadv/pwritev between the image and
   guest RAM; Python only starts a transfer and collects it (host/disk_transfers.py).

   Transfers(threads): the threads start at once, with every signal blocked.
   start(token, writing, fd, offset, buffers): queue a transfer; `buffers` are objects with the
     buffer protocol (views of guest RAM), held until the transfer is taken, writable ones when
     reading from the file. It moves every byte or fails: a short transfer goes on from where it
     stopped, the file's end before the last byte is EIO.
   take(): the transfers whose data has moved, as (token, errno or 0), in the order they ended;
     their buffers let go.
   fd: an eventfd the threads add 1 to for each transfer that ended (the caller resets it before
     take(), so none is missed).
   wait_idle(timeout=None): wait, without the GIL, until no transfer's data moves; False when
     `timeout` seconds passed first.
   moving: transfers started whose data has not finished moving.
   close(): wait for the transfers started, end the threads, let every buffer go and close the
     eventfd; start() refuses after it. Built by scripts/compile with the compiled group (pyvmm/compiled.py);
     without a build a disk serves every request where it was kicked. */

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
        job->next = NULL;

        pthread_mutex_lock(&t->lock);
        if (t->ended_tail)
            t->ended_tail->next = job;
        else
            t->ended = job;
        t->ended_tail = job;
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

static PyObject *transfers_start(Transfers *t, PyObject *args)
{
    PyObject *token, *buffers;
    int writing, fd;
    long long offset;
    if (!PyArg_ParseTuple(args, "OpiLO:start", &token, &writing, &fd, &offset, &buffers))
        return NULL;
    if (!t->initialised || t->closed) {
        PyErr_SetString(PyExc_RuntimeError, "Transfers: closed");
        return NULL;
    }
    if (fd < 0 || offset < 0) {
        PyErr_Format(PyExc_ValueError, "Transfers: fd %d, offset %lld", fd, offset);
        return NULL;
    }
    PyObject *fast = PySequence_Fast(buffers, "Transfers.start: buffers is not a sequence");
    if (fast == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(fast);
    if (count > INT_MAX) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "Transfers.start: too many buffers");
        return NULL;
    }
    Job *job = PyMem_RawCalloc(1, sizeof(Job));
    if (job != NULL) {
        job->views = PyMem_RawCalloc(count ? count : 1, sizeof(Py_buffer));
        job->iov = PyMem_RawCalloc(count ? count : 1, sizeof(struct iovec));
    }
    if (job == NULL || job->views == NULL || job->iov == NULL) {
        if (job != NULL)
            free_job(job);
        Py_DECREF(fast);
        return PyErr_NoMemory();
    }
    int flags = writing ? PyBUF_SIMPLE : PyBUF_WRITABLE;  /* reading from the file writes the buffers */
    for (Py_ssize_t i = 0; i < count; i++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, i), &job->views[i], flags) < 0) {
            free_job(job);
            Py_DECREF(fast);
            return NULL;
        }
        job->nviews = i + 1;
        job->iov[i].iov_base = job->views[i].buf;
        job->iov[i].iov_len = (size_t)job->views[i].len;
    }
    Py_DECREF(fast);
    Py_INCREF(token);
    job->token = token;
    job->fd = fd;
    job->writing = writing;
    job->offset = (off_t)offset;
    job->iovcnt = (int)count;

    pthread_mutex_lock(&t->lock);
    if (t->pending_tail)
        t->pending_tail->next = job;
    else
        t->pending = job;
    t->pending_tail = job;
    t->moving++;
    pthread_cond_signal(&t->work);
    pthread_mutex_unlock(&t->lock);
    Py_RETURN_NONE;
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
    {"start", (PyCFunction)transfers_start, METH_VARARGS, "Queue a transfer: (token, writing, fd, offset, buffers)."},
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
