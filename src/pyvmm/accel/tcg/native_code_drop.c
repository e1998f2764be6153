/* Dropping the code the software CPU translated from guest RAM that devices wrote, in one call.

   A 1 MiB disk read lands in about 256 scattered 4 KiB guest pages; from Python each page took
   two ctypes calls into the engine (its RAM offset, then the invalidation), about 250 us per
   request on the thread that shares the guest's host CPU. Here the same two engine functions
   are called for each run, from C.

   drop_written(ram_offset, invalidate, engine, regions, runs) -> bool
     ram_offset  address of the engine's qemu_ram_addr_from_host(engine, host) -> RAM offset
     invalidate  address of its tb_invalidate_phys_range(engine, start, end) (RAM offsets)
     engine      the engine (uc_engine *)
     regions     sequence of (guest base, guest end, host address): the RAM mapped into it
     runs        sequence of (guest-physical address, length) the devices wrote
   False when a piece of RAM is not one of the engine's RAM blocks (the caller then drops all
   translated code, as translated_code.py's Python path does). Parts of runs outside every
   region are skipped: no code is translated from them.

   Built by scripts/compile with the compiled group (pyvmm/compiled.py); without a build
   translated_code.py makes the same calls through ctypes. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define RAM_ADDR_INVALID UINT64_MAX

typedef uint64_t (*ram_offset_fn)(void *engine, void *host);
typedef void (*invalidate_fn)(void *engine, uint64_t start, uint64_t end);

typedef struct {
    uint64_t base, end, host;
} Region;

/* Two unsigned integers of a 2- or 3-item sequence (a tuple or a list), or -1 with an exception. */
static int unpack(PyObject *item, Py_ssize_t items, uint64_t *out)
{
    PyObject *fast = PySequence_Fast(item, "an item of drop_written's arguments is not a sequence");
    if (fast == NULL)
        return -1;
    if (PySequence_Fast_GET_SIZE(fast) != items) {
        PyErr_Format(PyExc_ValueError, "drop_written: an item of %zd values, not %zd",
                     PySequence_Fast_GET_SIZE(fast), items);
        Py_DECREF(fast);
        return -1;
    }
    for (Py_ssize_t i = 0; i < items; i++) {
        out[i] = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(fast, i));
        if (out[i] == (uint64_t)-1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
    }
    Py_DECREF(fast);
    return 0;
}

static PyObject *drop_written(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "drop_written(ram_offset, invalidate, engine, regions, runs)");
        return NULL;
    }
    uint64_t addresses[3];
    for (int i = 0; i < 3; i++) {
        addresses[i] = PyLong_AsUnsignedLongLong(args[i]);
        if (addresses[i] == (uint64_t)-1 && PyErr_Occurred())
            return NULL;
        if (addresses[i] == 0) {
            PyErr_SetString(PyExc_ValueError, "drop_written: a NULL engine or function");
            return NULL;
        }
    }
    ram_offset_fn ram_offset = (ram_offset_fn)(uintptr_t)addresses[0];
    invalidate_fn invalidate = (invalidate_fn)(uintptr_t)addresses[1];
    void *engine = (void *)(uintptr_t)addresses[2];

    PyObject *regions_seq = PySequence_Fast(args[3], "drop_written: regions is not a sequence");
    if (regions_seq == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(regions_seq);
    Region *regions = PyMem_Malloc(sizeof(Region) * (count ? count : 1));
    if (regions == NULL) {
        Py_DECREF(regions_seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        uint64_t values[3];
        if (unpack(PySequence_Fast_GET_ITEM(regions_seq, i), 3, values) < 0) {
            PyMem_Free(regions);
            Py_DECREF(regions_seq);
            return NULL;
        }
        regions[i] = (Region){values[0], values[1], values[2]};
    }
    Py_DECREF(regions_seq);

    PyObject *runs = PySequence_Fast(args[4], "drop_written: runs is not a sequence");
    if (runs == NULL) {
        PyMem_Free(regions);
        return NULL;
    }
    int all_ram = 1;
    Py_ssize_t run_count = PySequence_Fast_GET_SIZE(runs);
    for (Py_ssize_t r = 0; r < run_count && all_ram; r++) {
        uint64_t run[2];
        if (unpack(PySequence_Fast_GET_ITEM(runs, r), 2, run) < 0) {
            PyMem_Free(regions);
            Py_DECREF(runs);
            return NULL;
        }
        uint64_t start = run[0], end = run[0] + run[1];
        if (end < start)
            end = UINT64_MAX;  /* (a length past the top of the address space: up to it) */
        for (Py_ssize_t i = 0; i < count; i++) {
            uint64_t low = start > regions[i].base ? start : regions[i].base;
            uint64_t high = end < regions[i].end ? end : regions[i].end;
            if (low >= high)
                continue;
            uint64_t ram = ram_offset(engine, (void *)(uintptr_t)(regions[i].host + (low - regions[i].base)));
            if (ram == RAM_ADDR_INVALID) {
                all_ram = 0;
                break;
            }
            invalidate(engine, ram, ram + (high - low));
        }
    }
    PyMem_Free(regions);
    Py_DECREF(runs);
    return PyBool_FromLong(all_ram);
}

static PyMethodDef methods[] = {
    {"drop_written", (PyCFunction)(void (*)(void))drop_written, METH_FASTCALL,
     "drop_written(ram_offset, invalidate, engine, regions, runs) -> bool: drop the code translated from "
     "guest RAM the runs (address, length) cover; False where a region is not the engine's RAM."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "native_code_drop",
    "The software CPU's translated code dropped for device writes, from C (native_code_drop.c).", -1, methods,
};

PyMODINIT_FUNC PyInit_native_code_drop(void)
{
    return PyModule_Create(&module);
}
