/* KVM_RUN and the vCPU's hot loop in C, for the compiled run loop (kvm/run.py).

   ioctl(fd, request, arg): libc's ioctl with the GIL released; errno left as the call set it
   (taking the GIL back keeps errno), which run.py reads then. Through ctypes each call
   converted its three arguments: about twice this function's cost.

   serve_io_exits(ioctl, fd, counts, page, pio, mmio): enter the guest again and again, serving
   each single port access and each MMIO access from the handler tables of `pio` and `mmio`,
   until an exit that is anything else; its reason is returned, its details still in the page
   (-1: KVM_RUN was interrupted by a kick). The same loop as accel/kvm/io_exits.py, which
   serves where this module is not built, without a Python object per field: in Python the
   exit's decoding, the count, the page's slices and the lookups were most of an exit's cost
   in user space. A table is anything with `writers` and `readers` (dicts from an address to
   a handler: write(data: bytes), read(size) -> bytes) and `writer(address)` / `reader(address)`
   for a miss (the bus's, bus/bus.py); the tables are read again for every exit, since a bus
   replaces them when its ranges change. `ioctl` is this module's own (the GIL released around
   KVM_RUN) or any callable with its signature, which tests use to play KVM. `counts` is the
   list of exits by reason (the reason's low 6 bits). A failed KVM_RUN other than a kick raises
   RunFailed (an OSError with the errno); a handler's exception comes out as it is.

   Built by scripts/compile with the compiled group (pyvmm/compiled.py); without a build run.py
   calls libc's ioctl through ctypes and the accelerator runs io_exits.py's loop. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <linux/kvm.h>
#include <stddef.h>
#include <string.h>
#include <sys/ioctl.h>

#define COUNTED_REASONS 64 /* run.py's EXIT_REASONS_COUNTED */
#define RUN_INTERRUPTED -1

static PyObject *native_ioctl; /* this module's ioctl: the GIL-released call, no Python in between */
static PyObject *run_failed;
static PyObject *str_writers, *str_readers, *str_writer, *str_reader;
static PyObject *one; /* the count's increment, made once */

static PyObject *call_ioctl(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "ioctl(fd, request, arg) takes 3 arguments");
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    unsigned long request = PyLong_AsUnsignedLongMask(args[1]);
    unsigned long arg = PyLong_AsUnsignedLongMask(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (fd < INT_MIN || fd > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "fd out of range");
        return NULL;
    }
    int result;
    Py_BEGIN_ALLOW_THREADS
    result = ioctl((int)fd, request, arg);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(result);
}

/* KVM_RUN once: 0, RUN_INTERRUPTED, or -2 with RunFailed or the callable's exception set. */
static int enter(PyObject *ioctl_fn, int fd, PyObject *fd_object)
{
    long result;
    int err;
    if (ioctl_fn == native_ioctl) {
        Py_BEGIN_ALLOW_THREADS
        result = ioctl(fd, KVM_RUN, 0);
        err = result < 0 ? errno : 0;
        Py_END_ALLOW_THREADS
    } else {
        PyObject *args[3] = {fd_object, NULL, NULL};
        args[1] = PyLong_FromUnsignedLong(KVM_RUN);
        args[2] = PyLong_FromLong(0);
        PyObject *value = args[1] && args[2] ? PyObject_Vectorcall(ioctl_fn, args, 3, NULL) : NULL;
        err = errno; /* a failing call's, read before anything else can change it */
        Py_XDECREF(args[1]);
        Py_XDECREF(args[2]);
        if (value == NULL)
            return -2;
        result = PyLong_AsLong(value);
        Py_DECREF(value);
        if (result == -1 && PyErr_Occurred())
            return -2;
    }
    if (result >= 0)
        return 0;
    if (err == EINTR || err == EAGAIN)
        return RUN_INTERRUPTED;
    PyObject *exc = PyObject_CallFunction(run_failed, "is", err, strerror(err));
    if (exc != NULL) {
        PyErr_SetObject(run_failed, exc);
        Py_DECREF(exc);
    }
    return -2;
}

static int count_exit(PyObject *counts, unsigned int reason)
{
    Py_ssize_t slot = reason & (COUNTED_REASONS - 1);
    if (slot >= PyList_GET_SIZE(counts)) {
        PyErr_SetString(PyExc_ValueError, "serve_io_exits: the counts list is too short");
        return -1;
    }
    PyObject *old = PyList_GET_ITEM(counts, slot);
    PyObject *new = PyNumber_Add(old, one);
    if (new == NULL)
        return -1;
    PyList_SET_ITEM(counts, slot, new);
    Py_DECREF(old);
    return 0;
}

/* The table's handler for `address` (a new reference), the miss served by its writer()/reader(). */
static PyObject *handler(PyObject *table, PyObject *dict_name, PyObject *miss_name, unsigned long long address)
{
    PyObject *key = PyLong_FromUnsignedLongLong(address);
    if (key == NULL)
        return NULL;
    PyObject *dict = PyObject_GetAttr(table, dict_name);
    PyObject *found = NULL;
    if (dict != NULL) {
        if (!PyDict_Check(dict))
            PyErr_Format(PyExc_TypeError, "serve_io_exits: the table's %U is not a dict", dict_name);
        else {
            found = PyDict_GetItemWithError(dict, key);
            Py_XINCREF(found);
            if (found == NULL && !PyErr_Occurred())
                found = PyObject_CallMethodOneArg(table, miss_name, key);
        }
        Py_DECREF(dict);
    }
    Py_DECREF(key);
    return found;
}

/* A write: the handler called with the data as bytes. */
static int serve_write(PyObject *table, unsigned long long address, const char *data, Py_ssize_t size)
{
    PyObject *write = handler(table, str_writers, str_writer, address);
    if (write == NULL)
        return -1;
    PyObject *bytes = PyBytes_FromStringAndSize(data, size);
    PyObject *result = bytes ? PyObject_Vectorcall(write, &bytes, 1, NULL) : NULL;
    Py_XDECREF(bytes);
    Py_DECREF(write);
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

/* A read: the handler's answer copied to `into`, at most `room` bytes (short answers leave the rest). */
static int serve_read(PyObject *table, unsigned long long address, Py_ssize_t size, char *into, Py_ssize_t room)
{
    PyObject *read = handler(table, str_readers, str_reader, address);
    if (read == NULL)
        return -1;
    PyObject *size_object = PyLong_FromSsize_t(size);
    PyObject *answer = size_object ? PyObject_Vectorcall(read, &size_object, 1, NULL) : NULL;
    Py_XDECREF(size_object);
    Py_DECREF(read);
    if (answer == NULL)
        return -1;
    Py_buffer view;
    if (PyObject_GetBuffer(answer, &view, PyBUF_SIMPLE) < 0) {
        Py_DECREF(answer);
        return -1;
    }
    memcpy(into, view.buf, view.len < room ? (size_t)view.len : (size_t)room);
    PyBuffer_Release(&view);
    Py_DECREF(answer);
    return 0;
}

static PyObject *serve_io_exits(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "serve_io_exits(ioctl, fd, counts, page, pio, mmio) takes 6 arguments");
        return NULL;
    }
    PyObject *ioctl_fn = args[0], *fd_object = args[1], *counts = args[2], *pio = args[4], *mmio = args[5];
    long fd = PyLong_AsLong(fd_object);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT_MAX || !PyList_Check(counts)) {
        PyErr_SetString(PyExc_ValueError, "serve_io_exits: a bad fd or counts list");
        return NULL;
    }
    Py_buffer page;
    if (PyObject_GetBuffer(args[3], &page, PyBUF_WRITABLE) < 0)
        return NULL;
    if ((size_t)page.len < sizeof(struct kvm_run)) {
        PyBuffer_Release(&page);
        PyErr_SetString(PyExc_ValueError, "serve_io_exits: the page is smaller than kvm_run");
        return NULL;
    }
    struct kvm_run *run = page.buf;
    char *base = page.buf;
    long outcome;
    for (;;) {
        int entered = enter(ioctl_fn, (int)fd, fd_object);
        if (entered != 0) {
            outcome = entered;
            break;
        }
        unsigned int reason = run->exit_reason;
        if (count_exit(counts, reason) < 0) {
            outcome = -2;
            break;
        }
        if (reason == KVM_EXIT_IO) {
            unsigned long long offset = run->io.data_offset;
            Py_ssize_t size = run->io.size;
            if (run->io.count != 1) {
                outcome = reason; /* a string access: the caller serves it item by item */
                break;
            }
            if (offset > (unsigned long long)page.len || (unsigned long long)size > page.len - offset) {
                PyErr_SetString(PyExc_ValueError, "KVM_RUN: the port access's data lies outside the kvm_run mapping");
                outcome = -2;
                break;
            }
            int served = run->io.direction == KVM_EXIT_IO_OUT
                             ? serve_write(pio, run->io.port, base + offset, size)
                             : serve_read(pio, run->io.port, size, base + offset, size);
            if (served < 0) {
                outcome = -2;
                break;
            }
        } else if (reason == KVM_EXIT_MMIO) {
            Py_ssize_t length = run->mmio.len < sizeof(run->mmio.data) ? run->mmio.len : sizeof(run->mmio.data);
            int served = run->mmio.is_write
                             ? serve_write(mmio, run->mmio.phys_addr, (const char *)run->mmio.data, length)
                             : serve_read(mmio, run->mmio.phys_addr, run->mmio.len, (char *)run->mmio.data,
                                          sizeof(run->mmio.data));
            if (served < 0) {
                outcome = -2;
                break;
            }
        } else {
            outcome = reason;
            break;
        }
    }
    PyBuffer_Release(&page);
    return outcome == -2 ? NULL : PyLong_FromLong(outcome);
}

static PyMethodDef methods[] = {
    {"ioctl", (PyCFunction)(void (*)(void))call_ioctl, METH_FASTCALL,
     "ioctl(fd, request, arg) -> int: libc's ioctl with the GIL released; errno as the call left it"},
    {"serve_io_exits", (PyCFunction)(void (*)(void))serve_io_exits, METH_FASTCALL,
     "serve_io_exits(ioctl, fd, counts, page, pio, mmio) -> int: run the guest, serving single port and "
     "MMIO accesses, until another exit; its reason, or -1 for a kick"},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pyvmm.kvm.native_run", "KVM_RUN and the vCPU's hot loop in C (native_run.c)", -1,
    methods,
};

PyMODINIT_FUNC PyInit_native_run(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    str_writers = PyUnicode_InternFromString("writers");
    str_readers = PyUnicode_InternFromString("readers");
    str_writer = PyUnicode_InternFromString("writer");
    str_reader = PyUnicode_InternFromString("reader");
    one = PyLong_FromLong(1);
    native_ioctl = PyObject_GetAttrString(m, "ioctl");
    run_failed = PyErr_NewExceptionWithDoc("pyvmm.kvm.native_run.RunFailed",
                                           "KVM_RUN failed for another reason than a kick (an OSError with its errno)",
                                           PyExc_OSError, NULL);
    if (!str_writers || !str_readers || !str_writer || !str_reader || !one || !native_ioctl || !run_failed
        || PyModule_AddObjectRef(m, "RunFailed", run_failed) < 0
        || PyModule_AddIntConstant(m, "KVM_RUN", KVM_RUN) < 0
        || PyModule_AddIntConstant(m, "KVM_RUN_EXIT_OFFSET", offsetof(struct kvm_run, io)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
