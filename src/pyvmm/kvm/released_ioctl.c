/* ioctl(2) for KVM_RUN, called from the compiled run loop (kvm/run.py) with the GIL released.

   Through ctypes each call converts its three arguments through ctypes' machinery: about
   twice the cost of this function's call (a scratch loop of failing ioctls), paid on every
   exit of every vCPU. Same contract as libc's ioctl: the result, and errno left as the call
   set it on failure (taking the GIL back keeps errno), which run.py reads then.

   Built by scripts/compile with the compiled group (pyvmm/compiled.py); without a build
   run.py calls libc's ioctl through ctypes. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <sys/ioctl.h>

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

static PyMethodDef methods[] = {
    {"ioctl", (PyCFunction)(void (*)(void))call_ioctl, METH_FASTCALL,
     "ioctl(fd, request, arg) -> int: libc's ioctl with the GIL released; errno as the call left it"},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pyvmm.kvm.released_ioctl", "ioctl(2) with the GIL released (released_ioctl.c)", -1,
    methods,
};

PyMODINIT_FUNC PyInit_released_ioctl(void)
{
    return PyModule_Create(&module);
}
