/* Guest RAM loaded from the memory file when the uffd handler process ends before it did.

   In the uffd restore mode a handler process answers guest RAM's page faults (uffd.py). A VMM
   thread that holds the GIL and touches a page the handler had not loaded waits in the fault
   for the handler; if the handler has died, it waits for ever, and so does every other thread,
   the one that would notice the handler gone included (it needs the GIL). This thread needs no
   GIL: it waits for the handler's end (a pidfd), then answers the faults still coming and copies
   every page of RAM in from the memory file, which also wakes any fault the handler had read and
   never answered (UFFDIO_COPY wakes the threads waiting on the page it fills). The VM is still
   stopped with its one line by uffd.py's monitor, which can now get the GIL.

   Rescue(userfaultfd, memory_fd, pidfd, mappings, page_size): the thread starts at once, with
   duplicates of the three fds; mappings is a sequence of (host address, size, file offset).
   stop() ends it and waits for it (the GIL let go meanwhile); `pages` counts the pages it
   copied in. Built by scripts/compile with the compiled group (pyvmm/compiled.py); without a
   build uffd.py runs without it, as before. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>

typedef struct {
    uint64_t host, size, offset;
} Mapping;

typedef struct {
    PyObject_HEAD
    int uffd, memory, pidfd, stop;
    Mapping *mappings;
    Py_ssize_t count;
    uint64_t page_size;
    pthread_t thread;
    int running;
    volatile uint64_t pages;
} Rescue;

/* The page at `address` (page-aligned) from the file; 0, or -1 when RAM is no longer registered. */
static int fill(Rescue *r, char *buffer, uint64_t address)
{
    for (Py_ssize_t i = 0; i < r->count; i++) {
        Mapping *m = &r->mappings[i];
        if (address < m->host || address >= m->host + m->size)
            continue;
        ssize_t got = pread(r->memory, buffer, r->page_size, (off_t)(m->offset + (address - m->host)));
        if (got < 0)
            got = 0;  /* (the file's end, or a read error: zeroes, as a hole) */
        memset(buffer + got, 0, r->page_size - (size_t)got);
        struct uffdio_copy copy = {.dst = address, .src = (uint64_t)(uintptr_t)buffer, .len = r->page_size};
        if (ioctl(r->uffd, UFFDIO_COPY, &copy) == 0) {
            r->pages++;
            return 0;
        }
        if (errno == EEXIST || errno == EAGAIN)
            return 0;  /* present already, or being filled */
        return -1;     /* unregistered (uffd.py let RAM go), or the VM is closing */
    }
    return 0;
}

/* Answer the faults waiting in the queue; -1 when told to stop. */
static int answer_faults(Rescue *r, char *buffer)
{
    for (;;) {
        struct pollfd fds[2] = {{.fd = r->stop, .events = POLLIN}, {.fd = r->uffd, .events = POLLIN}};
        if (poll(fds, 2, 0) < 0)
            return errno == EINTR ? 0 : -1;
        if (fds[0].revents)
            return -1;
        if (!(fds[1].revents & POLLIN))
            return 0;
        struct uffd_msg msg;
        ssize_t got = read(r->uffd, &msg, sizeof msg);
        if (got != sizeof msg)
            return got < 0 && (errno == EAGAIN || errno == EINTR) ? 0 : -1;
        if (msg.event == UFFD_EVENT_PAGEFAULT && fill(r, buffer, msg.arg.pagefault.address & ~(r->page_size - 1)) < 0)
            return -1;
    }
}

static void *serve(void *arg)
{
    Rescue *r = arg;
    struct pollfd fds[2] = {{.fd = r->stop, .events = POLLIN}, {.fd = r->pidfd, .events = POLLIN}};
    while (poll(fds, 2, -1) < 0)
        if (errno != EINTR)
            return NULL;
    if (fds[0].revents)
        return NULL;  /* stopped while the handler still served */
    char *buffer = malloc(r->page_size);
    if (buffer == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < r->count; i++) {
        for (uint64_t at = 0; at < r->mappings[i].size; at += r->page_size) {
            if (answer_faults(r, buffer) < 0 || fill(r, buffer, r->mappings[i].host + at) < 0)
                goto done;
        }
    }
done:
    free(buffer);
    return NULL;
}

static void close_fds(Rescue *r)
{
    int *fds[4] = {&r->uffd, &r->memory, &r->pidfd, &r->stop};
    for (int i = 0; i < 4; i++) {
        if (*fds[i] >= 0)
            close(*fds[i]);
        *fds[i] = -1;
    }
}

static void stop_thread(Rescue *r)
{
    if (!r->running)
        return;
    uint64_t one = 1;
    if (write(r->stop, &one, sizeof one) < 0) {
        /* (an eventfd write cannot fail short of a full counter) */
    }
    Py_BEGIN_ALLOW_THREADS
    pthread_join(r->thread, NULL);
    Py_END_ALLOW_THREADS
    r->running = 0;
}

static PyObject *rescue_stop(Rescue *r, PyObject *unused)
{
    stop_thread(r);
    close_fds(r);
    Py_RETURN_NONE;
}

static PyObject *rescue_pages(Rescue *r, void *closure)
{
    return PyLong_FromUnsignedLongLong(r->pages);
}

static int rescue_init(Rescue *r, PyObject *args, PyObject *kwargs)
{
    int uffd, memory, pidfd;
    PyObject *mappings;
    unsigned long long page_size;
    if (!PyArg_ParseTuple(args, "iiiOK", &uffd, &memory, &pidfd, &mappings, &page_size))
        return -1;
    if (r->running || r->mappings != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Rescue: already started");
        return -1;
    }
    if (page_size == 0 || page_size & (page_size - 1)) {
        PyErr_Format(PyExc_ValueError, "Rescue: a page size of %llu", page_size);
        return -1;
    }
    PyObject *fast = PySequence_Fast(mappings, "Rescue: mappings is not a sequence");
    if (fast == NULL)
        return -1;
    r->count = PySequence_Fast_GET_SIZE(fast);
    r->mappings = PyMem_Calloc(r->count ? r->count : 1, sizeof(Mapping));
    if (r->mappings == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < r->count; i++) {
        Mapping *m = &r->mappings[i];
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "KKK;Rescue: a mapping is (host, size, offset)",
                              &m->host, &m->size, &m->offset)) {
            Py_DECREF(fast);
            return -1;
        }
    }
    Py_DECREF(fast);
    r->page_size = page_size;
    r->uffd = fcntl(uffd, F_DUPFD_CLOEXEC, 0);
    r->memory = fcntl(memory, F_DUPFD_CLOEXEC, 0);
    r->pidfd = fcntl(pidfd, F_DUPFD_CLOEXEC, 0);
    r->stop = eventfd(0, EFD_CLOEXEC);
    if (r->uffd < 0 || r->memory < 0 || r->pidfd < 0 || r->stop < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        close_fds(r);
        return -1;
    }
    int failed = pthread_create(&r->thread, NULL, serve, r);
    if (failed) {
        errno = failed;
        PyErr_SetFromErrno(PyExc_OSError);
        close_fds(r);
        return -1;
    }
    r->running = 1;
    return 0;
}

static PyObject *rescue_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    Rescue *r = (Rescue *)type->tp_alloc(type, 0);
    if (r != NULL)
        r->uffd = r->memory = r->pidfd = r->stop = -1;
    return (PyObject *)r;
}

static void rescue_dealloc(Rescue *r)
{
    stop_thread(r);
    close_fds(r);
    PyMem_Free(r->mappings);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyMethodDef rescue_methods[] = {
    {"stop", (PyCFunction)rescue_stop, METH_NOARGS, "End the thread (waiting for it) and close its fds."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef rescue_getset[] = {
    {"pages", (getter)rescue_pages, NULL, "pages copied in from the memory file", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RescueType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pyvmm.snapshot.uffd_rescue.Rescue",
    .tp_basicsize = sizeof(Rescue),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A thread without the GIL that loads guest RAM from the memory file once the uffd handler ended.",
    .tp_new = rescue_new,
    .tp_init = (initproc)rescue_init,
    .tp_dealloc = (destructor)rescue_dealloc,
    .tp_methods = rescue_methods,
    .tp_getset = rescue_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "uffd_rescue",
    "Guest RAM loaded from the memory file, without the GIL, when the uffd handler has ended (uffd_rescue.c).",
    -1, NULL,
};

PyMODINIT_FUNC PyInit_uffd_rescue(void)
{
    if (PyType_Ready(&RescueType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RescueType);
    if (PyModule_AddObject(m, "Rescue", (PyObject *)&RescueType) < 0) {
        Py_DECREF(&RescueType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
