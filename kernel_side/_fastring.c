/* Optional reader for the agent's BPF ring buffer: records come back to Python as a list of
 * bytes per poll, not as one ctypes callback per record.
 *
 * BCC's open_ring_buffer() calls a Python function through a libffi closure for every record,
 * and each call re-takes the GIL that ring_buffer__poll released. py-spy put about 20% of the
 * agent's samples at nginx max rate in that native path. Here libbpf's ring_buffer (the same
 * library BCC uses, libbpf.so.1, opened with dlopen because this machine has no libbpf
 * headers) calls a C function that copies each record into a growing arena while the GIL is
 * released; the list of bytes objects is built once, after the poll, with the GIL held.
 * The agent then hands each record to the same handler as before, in the same order.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>

typedef int (*sample_fn)(void *ctx, void *data, size_t size);
struct ring_buffer;

static struct {
    struct ring_buffer *(*new_)(int map_fd, sample_fn cb, void *ctx, const void *opts);
    int (*poll)(struct ring_buffer *rb, int timeout_ms);
    int (*consume)(struct ring_buffer *rb);
    void (*free_)(struct ring_buffer *rb);
} lib;

/* Stop a poll's copying once this much is buffered; the rest stays in the ring for the next
 * call (libbpf stops when the callback returns non-zero and keeps the unread records). */
#define ARENA_MAX (64u << 20)

typedef struct {
    PyObject_HEAD
    struct ring_buffer *rb;
    char *arena;
    size_t used, cap;
    size_t records;
    int oom;
} Ring;

static int load_libbpf(void)
{
    if (lib.new_ != NULL)
        return 0;
    void *h = dlopen("libbpf.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (h == NULL) {
        PyErr_Format(PyExc_ImportError, "libbpf.so.1 not found: %s", dlerror());
        return -1;
    }
    *(void **)&lib.new_ = dlsym(h, "ring_buffer__new");
    *(void **)&lib.poll = dlsym(h, "ring_buffer__poll");
    *(void **)&lib.consume = dlsym(h, "ring_buffer__consume");
    *(void **)&lib.free_ = dlsym(h, "ring_buffer__free");
    if (!lib.new_ || !lib.poll || !lib.consume || !lib.free_) {
        lib.new_ = NULL;
        PyErr_SetString(PyExc_ImportError, "libbpf.so.1 lacks the ring_buffer__* functions");
        return -1;
    }
    return 0;
}

/* Runs inside ring_buffer__poll without the GIL: copy the record, length first. */
static int on_sample(void *ctx, void *data, size_t size)
{
    Ring *r = ctx;
    size_t need = sizeof(uint32_t) + size;
    if (r->used + need > r->cap) {
        if (r->used > 0 && r->used + need > ARENA_MAX)
            return 1; /* keep the rest for the next poll */
        size_t cap = r->cap ? r->cap : 1u << 16;
        while (cap < r->used + need)
            cap *= 2;
        char *grown = realloc(r->arena, cap);
        if (grown == NULL) {
            r->oom = 1;
            return 1;
        }
        r->arena = grown;
        r->cap = cap;
    }
    uint32_t n = (uint32_t)size;
    memcpy(r->arena + r->used, &n, sizeof(n));
    memcpy(r->arena + r->used + sizeof(n), data, size);
    r->used += need;
    r->records++;
    return 0;
}

static PyObject *drain(Ring *r, int rc)
{
    size_t records = r->records, used = r->used;
    r->records = 0;
    r->used = 0;
    if (r->oom) {
        r->oom = 0;
        return PyErr_NoMemory();
    }
    if (rc < 0 && rc != -EINTR && records == 0) {
        /* Records already copied are returned first; the error recurs on the next call. */
        errno = -rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *out = PyList_New((Py_ssize_t)records);
    if (out == NULL)
        return NULL;
    size_t off = 0;
    for (size_t i = 0; i < records && off < used; i++) {
        uint32_t n;
        memcpy(&n, r->arena + off, sizeof(n));
        PyObject *b = PyBytes_FromStringAndSize(r->arena + off + sizeof(n), n);
        if (b == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, b);
        off += sizeof(n) + n;
    }
    /* Keep a big arena from a burst only while bursts last. */
    if (r->cap > (8u << 20)) {
        free(r->arena);
        r->arena = NULL;
        r->cap = 0;
    }
    return out;
}

static PyObject *ring_poll(Ring *r, PyObject *arg)
{
    int timeout = PyLong_AsLong(arg);
    if (timeout == -1 && PyErr_Occurred())
        return NULL;
    if (r->rb == NULL) {
        PyErr_SetString(PyExc_ValueError, "ring is closed");
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = lib.poll(r->rb, timeout);
    Py_END_ALLOW_THREADS
    return drain(r, rc);
}

static PyObject *ring_consume(Ring *r, PyObject *unused)
{
    (void)unused;
    if (r->rb == NULL) {
        PyErr_SetString(PyExc_ValueError, "ring is closed");
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = lib.consume(r->rb);
    Py_END_ALLOW_THREADS
    return drain(r, rc);
}

static PyObject *ring_close(Ring *r, PyObject *unused)
{
    (void)unused;
    if (r->rb != NULL) {
        lib.free_(r->rb);
        r->rb = NULL;
    }
    free(r->arena);
    r->arena = NULL;
    r->cap = r->used = r->records = 0;
    Py_RETURN_NONE;
}

static int ring_init(Ring *r, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"map_fd", NULL};
    int fd;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i:Ring", names, &fd))
        return -1;
    if (load_libbpf() < 0)
        return -1;
    if (r->rb != NULL) {
        PyErr_SetString(PyExc_ValueError, "Ring is already open");
        return -1;
    }
    errno = 0;
    r->rb = lib.new_(fd, on_sample, r, NULL);
    if (r->rb == NULL) {
        if (errno == 0)
            errno = EINVAL;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static void ring_dealloc(Ring *r)
{
    if (r->rb != NULL)
        lib.free_(r->rb);
    free(r->arena);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyMethodDef ring_methods[] = {
    {"poll", (PyCFunction)ring_poll, METH_O,
     "poll(timeout_ms) -> list[bytes]: wait up to timeout_ms for records, return them in order."},
    {"consume", (PyCFunction)ring_consume, METH_NOARGS,
     "consume() -> list[bytes]: the records available now, without waiting."},
    {"close", (PyCFunction)ring_close, METH_NOARGS, "close(): release the ring; idempotent."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kernel_side._fastring.Ring",
    .tp_basicsize = sizeof(Ring),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Ring(map_fd): a reader of one BPF ring buffer map (libbpf ring_buffer).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)ring_init,
    .tp_dealloc = (destructor)ring_dealloc,
    .tp_methods = ring_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastring",
    "Optional batch reader for the agent's BPF ring buffer; see kernel_side.ring.", -1,
    NULL, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastring(void)
{
    if (PyType_Ready(&RingType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RingType);
    if (PyModule_AddObject(m, "Ring", (PyObject *)&RingType) < 0) {
        Py_DECREF(&RingType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
