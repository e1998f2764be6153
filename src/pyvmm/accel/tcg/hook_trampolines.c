/* The software CPU's port-I/O and MMIO hooks as C functions libunicorn calls directly.

   A ctypes callback converts each C argument through its ctypes type and builds an argument
   tuple on every call: about twice the cost of these per guest port access (a scratch loop of
   OUT instructions), and the serial console makes about five such accesses per byte.

   Each hook's user data is a Target: the Python handler (guest_io.py's port_in, port_out,
   mmio_read, mmio_write, compiled), the object whose `current` is the running vCPU, and
   `failed`, which records an exception the handler raised and stops the slice (direct_hooks.py
   keeps the Unicorn binding's contract). Nothing here decides anything about a device: it only
   calls the handler.

   Also here: the C filters helper_patch.py's patched engine helpers call (set_filter).

   Built by scripts/compile with the compiled group (pyvmm/compiled.py); without a build,
   direct_hooks.py and helper_patch.py use ctypes callbacks that do the same. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef struct {
    PyObject_HEAD
    PyObject *handler;  /* handler(vcpu, port or address, size[, value]) */
    PyObject *running;  /* its `current`: the vCPU the engine runs */
    PyObject *failed;   /* failed(exception) */
    uint64_t base;      /* added to the offset Unicorn passes (an MMIO region's start) */
} Target;

static PyObject *current_name;  /* "current", interned */

/* The raised exception to failed(exception); none may unwind into libunicorn. */
static void report_failure(PyObject *failed)
{
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    if (value != NULL && traceback != NULL)
        PyException_SetTraceback(value, traceback);
    PyObject *done = value != NULL ? PyObject_CallOneArg(failed, value) : NULL;
    if (done == NULL)  /* (failed() itself failed) */
        PyErr_WriteUnraisable(failed);
    Py_XDECREF(done);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
}

/* handler(running.current, address, size[, value]); its result as an integer when `wanted` */
static uint64_t call_handler(Target *target, uint64_t address, unsigned size, int with_value, uint64_t value,
                             int wanted)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    uint64_t answer = 0;
    PyObject *result = NULL;
    PyObject *args[4] = {PyObject_GetAttr(target->running, current_name), PyLong_FromUnsignedLongLong(address),
                         PyLong_FromUnsignedLong(size), with_value ? PyLong_FromUnsignedLongLong(value) : NULL};
    if (args[0] != NULL && args[1] != NULL && args[2] != NULL && (!with_value || args[3] != NULL))
        result = PyObject_Vectorcall(target->handler, args, with_value ? 4 : 3, NULL);
    for (int i = 0; i < 4; i++)
        Py_XDECREF(args[i]);
    if (result != NULL && wanted) {
        answer = PyLong_AsUnsignedLongLongMask(result);
        if (answer == (uint64_t)-1 && PyErr_Occurred())
            Py_CLEAR(result);
    }
    if (result == NULL) {
        answer = 0;
        report_failure(target->failed);
    }
    Py_XDECREF(result);
    PyGILState_Release(gil);
    return answer;
}

/* Unicorn 2's callback types: uc_cb_insn_in_t, uc_cb_insn_out_t, uc_cb_mmio_read_t, uc_cb_mmio_write_t */
static uint32_t on_in(void *uc, uint32_t port, int size, void *user_data)
{
    return (uint32_t)call_handler(user_data, port, (unsigned)size, 0, 0, 1);
}

static void on_out(void *uc, uint32_t port, int size, uint32_t value, void *user_data)
{
    call_handler(user_data, port, (unsigned)size, 1, value, 0);
}

static uint64_t on_mmio_read(void *uc, uint64_t offset, unsigned size, void *user_data)
{
    Target *target = user_data;
    return call_handler(target, target->base + offset, size, 0, 0, 1);
}

static void on_mmio_write(void *uc, uint64_t offset, unsigned size, uint64_t value, void *user_data)
{
    Target *target = user_data;
    call_handler(target, target->base + offset, size, 1, value, 0);
}

/* helper_patch.py's filters: a patched engine helper's stub calls filter(env, arg1, arg2, &out)
   and runs the helper, or not, by the action it returns (helper_patch.PASS, HANDLED, ...). The
   stub passes no user data, so each slot has a C entry of its own: slot N calls
   handlers[N](env, arg1, arg2) -> (action, value) and stores value in *out. A handler that
   raises, or returns something else, goes to failures[N] and the helper runs as built
   (action 0). helper_patch.py gives each helper a slot of its own and sets it again when it
   patches the helper again (a handler is held for the call, so one replaced meanwhile lives
   until the call returns). */
#define FILTER_SLOTS 8
static PyObject *filter_handlers[FILTER_SLOTS];
static PyObject *filter_failures[FILTER_SLOTS];

static int call_filter(int slot, void *env, uint64_t arg1, uint64_t arg2, uint64_t *out)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    int action = 0;
    PyObject *handler = filter_handlers[slot], *failed = filter_failures[slot];
    if (handler == NULL || failed == NULL) {  /* (never set: the stub is only installed after) */
        PyGILState_Release(gil);
        return 0;
    }
    Py_INCREF(handler);
    Py_INCREF(failed);
    PyObject *args[3] = {PyLong_FromVoidPtr(env), PyLong_FromUnsignedLongLong(arg1),
                         PyLong_FromUnsignedLongLong(arg2)};
    PyObject *result = NULL;
    if (args[0] != NULL && args[1] != NULL && args[2] != NULL)
        result = PyObject_Vectorcall(handler, args, 3, NULL);
    for (int i = 0; i < 3; i++)
        Py_XDECREF(args[i]);
    if (result != NULL) {
        if (PyTuple_Check(result) && PyTuple_GET_SIZE(result) == 2) {
            long wanted = PyLong_AsLong(PyTuple_GET_ITEM(result, 0));
            uint64_t value = PyLong_AsUnsignedLongLongMask(PyTuple_GET_ITEM(result, 1));
            if (!PyErr_Occurred()) {
                action = (int)wanted;
                *out = value;
            }
        } else {
            PyErr_SetString(PyExc_TypeError, "a helper filter returns (action, value)");
        }
        Py_DECREF(result);
    }
    if (PyErr_Occurred()) {
        action = 0;
        report_failure(failed);
    }
    Py_DECREF(handler);
    Py_DECREF(failed);
    PyGILState_Release(gil);
    return action;
}

#define FILTER_ENTRY(n) \
    static int filter_##n(void *env, uint64_t arg1, uint64_t arg2, uint64_t *out) \
    { \
        return call_filter(n, env, arg1, arg2, out); \
    }
FILTER_ENTRY(0)
FILTER_ENTRY(1)
FILTER_ENTRY(2)
FILTER_ENTRY(3)
FILTER_ENTRY(4)
FILTER_ENTRY(5)
FILTER_ENTRY(6)
FILTER_ENTRY(7)
static void *filter_entries[FILTER_SLOTS] = {
    (void *)filter_0, (void *)filter_1, (void *)filter_2, (void *)filter_3,
    (void *)filter_4, (void *)filter_5, (void *)filter_6, (void *)filter_7,
};

static PyObject *set_filter(PyObject *module, PyObject *args)
{
    int slot;
    PyObject *handler, *failed;
    if (!PyArg_ParseTuple(args, "iOO", &slot, &handler, &failed))
        return NULL;
    if (slot < 0 || slot >= FILTER_SLOTS) {
        PyErr_Format(PyExc_ValueError, "filter slot %d is not in 0..%d", slot, FILTER_SLOTS - 1);
        return NULL;
    }
    if (!PyCallable_Check(handler) || !PyCallable_Check(failed)) {
        PyErr_SetString(PyExc_TypeError, "handler and failed must be callable");
        return NULL;
    }
    Py_INCREF(handler);
    Py_INCREF(failed);
    Py_XSETREF(filter_handlers[slot], handler);
    Py_XSETREF(filter_failures[slot], failed);
    return PyLong_FromVoidPtr(filter_entries[slot]);
}

static PyMethodDef functions[] = {
    {"set_filter", set_filter, METH_VARARGS,
     "set_filter(slot, handler, failed): slot's C filter (its address, for helper_patch's stub) "
     "calls handler(env, arg1, arg2) -> (action, value) from now on"},
    {NULL},
};

static PyObject *target_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"handler", "running", "failed", "base", NULL};
    PyObject *handler, *running, *failed;
    unsigned long long base = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|K", names, &handler, &running, &failed, &base))
        return NULL;
    if (!PyCallable_Check(handler) || !PyCallable_Check(failed)) {
        PyErr_SetString(PyExc_TypeError, "handler and failed must be callable");
        return NULL;
    }
    Target *self = (Target *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    Py_INCREF(handler);
    Py_INCREF(running);
    Py_INCREF(failed);
    self->handler = handler;
    self->running = running;
    self->failed = failed;
    self->base = base;
    return (PyObject *)self;
}

static int target_traverse(Target *self, visitproc visit, void *arg)
{
    Py_VISIT(self->handler);
    Py_VISIT(self->running);
    Py_VISIT(self->failed);
    return 0;
}

static int target_clear(Target *self)
{
    Py_CLEAR(self->handler);
    Py_CLEAR(self->running);
    Py_CLEAR(self->failed);
    return 0;
}

static void target_dealloc(Target *self)
{
    PyObject_GC_UnTrack(self);
    target_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *target_address(Target *self, void *closure)
{
    return PyLong_FromVoidPtr(self);
}

static PyGetSetDef target_getset[] = {
    {"address", (getter)target_address, NULL, "the user data to register with the hook (lives as long as this)",
     NULL},
    {NULL},
};

static PyTypeObject TargetType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pyvmm.accel.tcg.hook_trampolines.Target",
    .tp_doc = "Target(handler, running, failed, base=0): what one hook calls",
    .tp_basicsize = sizeof(Target),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = target_new,
    .tp_traverse = (traverseproc)target_traverse,
    .tp_clear = (inquiry)target_clear,
    .tp_dealloc = (destructor)target_dealloc,
    .tp_getset = target_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pyvmm.accel.tcg.hook_trampolines",
    "Unicorn port-I/O and MMIO hooks and helper filters in C (see hook_trampolines.c)", -1, functions,
};

PyMODINIT_FUNC PyInit_hook_trampolines(void)
{
    if (PyType_Ready(&TargetType) < 0)
        return NULL;
    current_name = PyUnicode_InternFromString("current");
    if (current_name == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&TargetType);
    if (PyModule_AddObject(m, "Target", (PyObject *)&TargetType) < 0
        || PyModule_AddObject(m, "ON_IN", PyLong_FromVoidPtr((void *)on_in)) < 0
        || PyModule_AddObject(m, "ON_OUT", PyLong_FromVoidPtr((void *)on_out)) < 0
        || PyModule_AddObject(m, "ON_MMIO_READ", PyLong_FromVoidPtr((void *)on_mmio_read)) < 0
        || PyModule_AddObject(m, "ON_MMIO_WRITE", PyLong_FromVoidPtr((void *)on_mmio_write)) < 0
        || PyModule_AddIntConstant(m, "FILTER_SLOTS", FILTER_SLOTS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
