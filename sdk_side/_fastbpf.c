/* Optional accelerator for the annotate hot path.
 *
 * 1. update()/delete(): BPF_MAP_{UPDATE,DELETE}_ELEM without ctypes. Through ctypes one map
 *    update costs about 0.5 us more than the same syscall from C: argument conversion plus
 *    releasing and re-taking the GIL around a call that itself takes about 1 us. These keep the
 *    GIL (the syscall never blocks: a hash-map update takes a bucket spinlock and returns) and
 *    read the bpf_attr straight from the ctypes structure the caller preallocated, through the
 *    buffer protocol, so no raw address ever crosses from Python.
 * 2. Slot, annotate() and Entry: the common calls of sdk_side._writer.annotate in C (every
 *    value a str whose record the writer has already encoded and cached). Slot is the base type
 *    of the writer's per-thread state: its fields are the mirror the Python code reads and
 *    writes as attributes, so both paths share one state. Entry is what the writer exports as
 *    ``annotate``: it makes the Python function's checks from state the writer keeps current
 *    (setup, gate) and its write, without running Python code; any other call goes to the
 *    Python function unchanged. Python code runs slower right after a bpf(2) call than in a
 *    loop without one: the Python part of a steady annotate took 0.73 us with the syscall
 *    stubbed out and about 1.1 us around the real one (measured on the 2-core VM), so every
 *    bytecode left around the call costs more than it seems.
 * 3. map_cells(): where this process may map ctx_cells (root), every update and delete of a
 *    thread's own ctx_by_tid entry that passes through 1. or 2. is done on the thread's cell in
 *    memory instead, with the same answers (0, EEXIST, ENOENT) the map would give, so the writer's
 *    logic is unchanged and no bpf(2) call is made. See bridge_ctx_cell in bpf/bridge_abi.h.
 *
 * sdk_side._bpf falls back to ctypes and pure Python when this module is not built; both return
 * 0 or an errno and never raise for kernel errors.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <string.h>
#include <time.h>
#include <linux/bpf.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

/* The BPF_MAP_*_ELEM member of union bpf_attr: map_fd, pad, key, value, flags. */
#define ELEM_ATTR_SIZE 32

/* --- ctx_cells ---------------------------------------------------------------------------- */

/* Set by configure() from bridge._abi and by map_cells(). Touched only with the GIL held,
 * as are the cells: map_cells() never unmaps memory another thread is writing. */
static struct {
    int ready;
    Py_ssize_t count, size, value_off;
    int bits;
    unsigned long long hash;
    unsigned char *base; /* the mapping, or NULL */
    size_t len;
    int tid_fd; /* the fd number of ctx_by_tid the writer's arguments carry */
    Py_ssize_t claimed, taken;
} cells = {0, 0, 0, 0, 0, 0, NULL, 0, -1, 0, 0};

#define NOT_A_CELL (-1)

static unsigned long long cell_owner(const unsigned char *key)
{
    unsigned long long ino;
    unsigned tid;
    memcpy(&ino, key, 8);
    memcpy(&tid, key + 8, 4);
    if ((ino >> 32) != 0 || tid == 0)
        return 0;
    return (ino << 32) | tid;
}

static unsigned char *cell_at(unsigned long long owner)
{
    unsigned long long idx = (owner * cells.hash) >> (64 - cells.bits);
    return cells.base + (size_t)idx * (size_t)cells.size;
}

/* The thread key a MapElemAttr names when it is a write to ctx_by_tid with cells mapped. */
static const unsigned char *tid_key_of(const unsigned char *attr)
{
    unsigned map_fd;
    unsigned long long key;
    if (cells.base == NULL)
        return NULL;
    memcpy(&map_fd, attr, 4);
    if ((int)map_fd != cells.tid_fd)
        return NULL;
    memcpy(&key, attr + 8, 8);
    return (const unsigned char *)(uintptr_t)key;
}

/* The cell of the thread a MapElemAttr's key names, when that thread claimed it. */
static unsigned char *cell_of(const unsigned char *attr)
{
    const unsigned char *key = tid_key_of(attr);
    unsigned long long owner, held;
    unsigned char *cell;
    if (key == NULL)
        return NULL;
    owner = cell_owner(key);
    if (owner == 0)
        return NULL;
    cell = cell_at(owner);
    memcpy(&held, cell, 8);
    return held == owner ? cell : NULL;
}

/* BPF_MAP_UPDATE_ELEM/DELETE_ELEM on the attr's cell: 0 or the errno the map would give, or
 * NOT_A_CELL when the key's thread has no cell (then the map is used). */
static int cell_cmd(const unsigned char *attr, int cmd)
{
    unsigned char *cell = cell_of(attr);
    unsigned live;
    if (cell == NULL)
        return NOT_A_CELL;
    memcpy(&live, cell + 8, 4);
    if (cmd == BPF_MAP_DELETE_ELEM) {
        if (!live)
            return ENOENT;
        live = 0;
    } else {
        unsigned long long value, flags;
        memcpy(&value, attr + 16, 8);
        memcpy(&flags, attr + 24, 8);
        if (value == 0 || flags > BPF_EXIST)
            return EINVAL;
        if (flags == BPF_NOEXIST && live)
            return EEXIST;
        if (flags == BPF_EXIST && !live)
            return ENOENT;
        memcpy(cell + cells.value_off, (const void *)(uintptr_t)value,
               (size_t)(cells.size - cells.value_off));
        live = 1;
    }
    memcpy(cell + 8, &live, 4);
    return 0;
}

/* Claim the cell of the thread ``key`` names (the calling thread, binding its state): 1 when
 * it is this thread's now, 0 when another thread holds it. A cell already holding this owner
 * word was left by an earlier thread with the same id that died while no agent ran (or this
 * thread's previous state): its context is not this state's, so it is cleared. */
static int cell_claim(const unsigned char *key)
{
    unsigned long long owner = cell_owner(key), expected = 0;
    unsigned char *cell;
    unsigned zero = 0;
    if (cells.base == NULL || owner == 0)
        return 0;
    cell = cell_at(owner);
    if (!__atomic_compare_exchange_n((unsigned long long *)cell, &expected, owner, 0,
                                     __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST) &&
        expected != owner) {
        cells.taken += 1;
        return 0;
    }
    memcpy(cell + 8, &zero, 4);
    cells.claimed += 1;
    return 1;
}

static PyObject *elem_cmd(PyObject *attr, int cmd)
{
    Py_buffer view;
    long rc;
    int err = 0;

    if (PyObject_GetBuffer(attr, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (view.len != ELEM_ATTR_SIZE) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_ValueError, "bpf_attr must be %d bytes, got %zd", ELEM_ATTR_SIZE,
                     view.len);
        return NULL;
    }
    err = cell_cmd((const unsigned char *)view.buf, cmd);
    if (err == NOT_A_CELL) {
        err = 0;
        /* The kernel reads only the first 32 bytes of the union for these commands. */
        rc = syscall(__NR_bpf, cmd, view.buf, (unsigned int)ELEM_ATTR_SIZE);
        if (rc != 0)
            err = errno;
    }
    PyBuffer_Release(&view);
    return PyLong_FromLong(err);
}

static PyObject *update(PyObject *self, PyObject *attr)
{
    (void)self;
    return elem_cmd(attr, BPF_MAP_UPDATE_ELEM);
}

static PyObject *delete_(PyObject *self, PyObject *attr)
{
    (void)self;
    return elem_cmd(attr, BPF_MAP_DELETE_ELEM);
}


/* --- the annotate fast path ------------------------------------------------------------- */

/* The value layout, set once by configure() from bridge._abi (the single source of truth). */
static struct {
    int ready;
    unsigned abi_version;
    Py_ssize_t data_off, sdk_off, sdk_size, value_size, max_attrs, attr_bytes;
    unsigned f_truncated, f_sdk_span;
} abi;

#define MAX_ATTRS_CAP 64

typedef struct {
    PyObject_HEAD
    /* The mirror (see sdk_side._writer._Thread): what this thread's entry holds as far as the
     * thread knows. Exposed as attributes; never NULL. */
    PyObject *mirror;     /* dict: key -> encoded record (bytes); never mutated in place */
    PyObject *data;       /* bytes: the records joined */
    PyObject *sdk;        /* bytes: the SDK span the entry names, or b"" */
    PyObject *sdk_in_buf; /* bytes: what the value buffer holds in its SDK span field */
    char trunc, synced, stale;
    int port;
    Py_ssize_t req_calls, req_len, filled;
    Py_ssize_t gen; /* the map generation the preallocated arguments refer to */
    /* Set by bind(): the value buffer and the three update arguments that point at it. */
    int bound;
    Py_buffer value, a_exist, a_noexist, a_any;
} Slot;

static PyObject *empty_bytes;

static int slot_init_fields(Slot *s)
{
    s->mirror = PyDict_New();
    if (s->mirror == NULL)
        return -1;
    Py_INCREF(empty_bytes);
    s->data = empty_bytes;
    Py_INCREF(empty_bytes);
    s->sdk = empty_bytes;
    Py_INCREF(empty_bytes);
    s->sdk_in_buf = empty_bytes;
    return 0;
}

static PyObject *slot_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Slot *s;
    (void)args;
    (void)kwds;
    s = (Slot *)type->tp_alloc(type, 0);
    if (s == NULL)
        return NULL;
    if (slot_init_fields(s) < 0) {
        Py_DECREF(s);
        return NULL;
    }
    return (PyObject *)s;
}

static void slot_unbind(Slot *s)
{
    if (!s->bound)
        return;
    s->bound = 0;
    PyBuffer_Release(&s->value);
    PyBuffer_Release(&s->a_exist);
    PyBuffer_Release(&s->a_noexist);
    PyBuffer_Release(&s->a_any);
}

static void slot_dealloc(Slot *s)
{
    slot_unbind(s);
    Py_CLEAR(s->mirror);
    Py_CLEAR(s->data);
    Py_CLEAR(s->sdk);
    Py_CLEAR(s->sdk_in_buf);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static int get_attr_view(PyObject *obj, Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0)
        return -1;
    if (view->len != ELEM_ATTR_SIZE) {
        PyErr_Format(PyExc_ValueError, "bpf_attr must be %d bytes, got %zd", ELEM_ATTR_SIZE,
                     view->len);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *slot_bind(Slot *s, PyObject *const *args, Py_ssize_t nargs)
{
    Py_buffer value, ex, nx, any;

    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "bind(value, exist, noexist, any) takes 4 arguments");
        return NULL;
    }
    if (!abi.ready) {
        PyErr_SetString(PyExc_RuntimeError, "_fastbpf.configure() was not called");
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &value, PyBUF_WRITABLE) < 0)
        return NULL;
    if (value.len != abi.value_size) {
        PyErr_Format(PyExc_ValueError, "value buffer must be %zd bytes, got %zd",
                     abi.value_size, value.len);
        PyBuffer_Release(&value);
        return NULL;
    }
    if (get_attr_view(args[1], &ex) < 0)
        goto fail_value;
    if (get_attr_view(args[2], &nx) < 0)
        goto fail_ex;
    if (get_attr_view(args[3], &any) < 0)
        goto fail_nx;
    slot_unbind(s);
    s->value = value;
    s->a_exist = ex;
    s->a_noexist = nx;
    s->a_any = any;
    s->bound = 1;
    if (ex.len == ELEM_ATTR_SIZE) {
        const unsigned char *key = tid_key_of((const unsigned char *)ex.buf);
        if (key != NULL)
            cell_claim(key);
    }
    Py_RETURN_NONE;
fail_nx:
    PyBuffer_Release(&nx);
fail_ex:
    PyBuffer_Release(&ex);
fail_value:
    PyBuffer_Release(&value);
    return NULL;
}

static PyMethodDef slot_methods[] = {
    {"bind", (PyCFunction)(void (*)(void))slot_bind, METH_FASTCALL,
     "bind(value, exist, noexist, any): the value buffer (bytearray, CTX_VALUE_SIZE bytes) and\n"
     "the three preallocated MapElemAttr whose value points at it. Keeps them exported."},
    {NULL, NULL, 0, NULL},
};

static int set_bytes_member(PyObject **slot, PyObject *v, const char *name)
{
    if (v == NULL || !PyBytes_Check(v)) {
        PyErr_Format(PyExc_TypeError, "%s must be bytes", name);
        return -1;
    }
    Py_INCREF(v);
    Py_SETREF(*slot, v);
    return 0;
}

#define BYTES_GETSET(field)                                                                  \
    static PyObject *get_##field(Slot *s, void *c)                                           \
    {                                                                                        \
        (void)c;                                                                             \
        Py_INCREF(s->field);                                                                 \
        return s->field;                                                                     \
    }                                                                                        \
    static int set_##field(Slot *s, PyObject *v, void *c)                                    \
    {                                                                                        \
        (void)c;                                                                             \
        return set_bytes_member(&s->field, v, #field);                                       \
    }

BYTES_GETSET(data)
BYTES_GETSET(sdk)
BYTES_GETSET(sdk_in_buf)

static PyObject *get_mirror(Slot *s, void *c)
{
    (void)c;
    Py_INCREF(s->mirror);
    return s->mirror;
}

static int set_mirror(Slot *s, PyObject *v, void *c)
{
    (void)c;
    if (v == NULL || !PyDict_CheckExact(v)) {
        PyErr_SetString(PyExc_TypeError, "mirror must be a dict");
        return -1;
    }
    Py_INCREF(v);
    Py_SETREF(s->mirror, v);
    return 0;
}

static PyGetSetDef slot_getset[] = {
    {"mirror", (getter)get_mirror, (setter)set_mirror, "key -> encoded record", NULL},
    {"data", (getter)get_data, (setter)set_data, "the records joined", NULL},
    {"sdk", (getter)get_sdk, (setter)set_sdk, "the SDK span field, or b''", NULL},
    {"sdk_in_buf", (getter)get_sdk_in_buf, (setter)set_sdk_in_buf,
     "what the value buffer holds in its SDK span field", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef slot_members[] = {
    {"trunc", T_BOOL, offsetof(Slot, trunc), 0, "the entry carries CTX_F_TRUNCATED"},
    {"synced", T_BOOL, offsetof(Slot, synced), 0, "the buffer holds exactly the mirror's value"},
    {"stale", T_BOOL, offsetof(Slot, stale), 0, "the last write found the entry cleared"},
    {"port", T_INT, offsetof(Slot, port), 0, "the bound inbound connection's client port"},
    {"req_calls", T_PYSSIZET, offsetof(Slot, req_calls), 0, "calls since the last clear"},
    {"req_len", T_PYSSIZET, offsetof(Slot, req_len), 0, "calls the previous request made"},
    {"filled", T_PYSSIZET, offsetof(Slot, filled), 0, "data bytes in the value buffer"},
    {"gen", T_PYSSIZET, offsetof(Slot, gen), 0, "the map generation the arguments refer to"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject SlotType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sdk_side._fastbpf.Slot",
    .tp_basicsize = sizeof(Slot),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Per-thread writer state shared by the C and Python annotate paths.",
    .tp_new = slot_new,
    .tp_dealloc = (destructor)slot_dealloc,
    .tp_methods = slot_methods,
    .tp_members = slot_members,
    .tp_getset = slot_getset,
};

static void put_u16(unsigned char *p, unsigned v)
{
    p[0] = (unsigned char)(v & 0xff);
    p[1] = (unsigned char)((v >> 8) & 0xff);
}

/* What sdk_side._writer._Thread.fill does: the header, the SDK span field when it changed, the
 * data, and zeros over what a longer earlier value left behind. */
static void fill(Slot *s, Py_ssize_t count, const char *data, Py_ssize_t total, int trunc,
                 int port, PyObject *sdk)
{
    unsigned char *buf = (unsigned char *)s->value.buf;
    unsigned flags = 0;
    Py_ssize_t sdk_len = PyBytes_GET_SIZE(sdk);

    if (trunc)
        flags |= abi.f_truncated;
    if (sdk_len)
        flags |= abi.f_sdk_span;
    if (sdk != s->sdk_in_buf) {
        Py_ssize_t in_len = PyBytes_GET_SIZE(s->sdk_in_buf);
        if (sdk_len != in_len || memcmp(PyBytes_AS_STRING(sdk), PyBytes_AS_STRING(s->sdk_in_buf),
                                        (size_t)sdk_len) != 0) {
            memset(buf + abi.sdk_off, 0, (size_t)abi.sdk_size);
            memcpy(buf + abi.sdk_off, PyBytes_AS_STRING(sdk),
                   (size_t)(sdk_len < abi.sdk_size ? sdk_len : abi.sdk_size));
        }
        Py_INCREF(sdk);
        Py_SETREF(s->sdk_in_buf, sdk);
    }
    put_u16(buf, abi.abi_version);
    buf[2] = (unsigned char)count;
    buf[3] = (unsigned char)flags;
    put_u16(buf + 4, (unsigned)total);
    put_u16(buf + 6, (unsigned)port);
    memcpy(buf + abi.data_off, data, (size_t)total);
    if (total < s->filled)
        memset(buf + abi.data_off + total, 0, (size_t)(s->filled - total));
    s->filled = total;
    s->synced = 0;
}

static int elem_update(Py_buffer *attr)
{
    int err = cell_cmd((const unsigned char *)attr->buf, BPF_MAP_UPDATE_ELEM);
    if (err != NOT_A_CELL)
        return err;
    if (syscall(__NR_bpf, BPF_MAP_UPDATE_ELEM, attr->buf, (unsigned int)ELEM_ATTR_SIZE) == 0)
        return 0;
    return errno;
}

/* The mirror after a successful write. Steals nothing: takes its own references. */
static void set_state(Slot *s, PyObject *mirror, PyObject *data, int trunc, int port)
{
    Py_INCREF(mirror);
    Py_SETREF(s->mirror, mirror);
    Py_INCREF(data);
    Py_SETREF(s->data, data);
    s->trunc = (char)(trunc != 0);
    s->port = port;
    s->synced = 1;
}

static int bytes_equal(PyObject *a, PyObject *b)
{
    Py_ssize_t n;
    if (a == b)
        return 1;
    if (!PyBytes_CheckExact(a))
        return 0;
    n = PyBytes_GET_SIZE(a);
    return n == PyBytes_GET_SIZE(b) &&
           memcmp(PyBytes_AS_STRING(a), PyBytes_AS_STRING(b), (size_t)n) == 0;
}

/* Records joined in the order given, or NULL with an exception set. */
static PyObject *join(PyObject **recs, Py_ssize_t n, Py_ssize_t total)
{
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    char *p;
    Py_ssize_t i;
    if (out == NULL)
        return NULL;
    p = PyBytes_AS_STRING(out);
    for (i = 0; i < n; i++) {
        Py_ssize_t len = PyBytes_GET_SIZE(recs[i]);
        memcpy(p, PyBytes_AS_STRING(recs[i]), (size_t)len);
        p += len;
    }
    return out;
}

#define NOT_HANDLED (-1)

/* Set by setup() from sdk_side._writer: how a str record is built and cached. */
static struct {
    int ready;
    Py_ssize_t max_str_len, per_key_max;
    unsigned attr_str;
} strenc;

/* The record of str value ``v`` under validated key ``k`` when the writer's cache has none,
 * built as sdk_side._writer._record builds it and cached the same way (the per-key dict is
 * cleared when full). Borrowed (the cache holds it); NULL without an exception when the Python
 * path must encode (a value over MAX_STR_LEN is truncated and counted there; one that is not
 * valid UTF-8 is encoded with "replace" there). */
static PyObject *encode_str(PyObject *k, PyObject *v, PyObject *known)
{
    const char *kb, *vb;
    Py_ssize_t kl, vl;
    PyObject *rec;
    unsigned char *p;

    if (!strenc.ready || !PyUnicode_CheckExact(k))
        return NULL;
    kb = PyUnicode_AsUTF8AndSize(k, &kl);
    if (kb == NULL)
        goto declined;
    vb = PyUnicode_AsUTF8AndSize(v, &vl);
    if (vb == NULL)
        goto declined;
    if (vl > strenc.max_str_len || kl > 255)
        return NULL;
    rec = PyBytes_FromStringAndSize(NULL, 4 + kl + vl);
    if (rec == NULL)
        return NULL;
    p = (unsigned char *)PyBytes_AS_STRING(rec);
    p[0] = (unsigned char)strenc.attr_str;
    p[1] = (unsigned char)kl;
    put_u16(p + 2, (unsigned)vl);
    memcpy(p + 4, kb, (size_t)kl);
    memcpy(p + 4 + kl, vb, (size_t)vl);
    if (PyDict_GET_SIZE(known) >= strenc.per_key_max)
        PyDict_Clear(known);
    if (PyDict_SetItem(known, v, rec) < 0) {
        Py_DECREF(rec);
        return NULL;
    }
    Py_DECREF(rec);
    return rec;
declined:
    PyErr_Clear();
    return NULL;
}

/* annotate(slot, attrs, strs) -> int
 *
 * The writer's annotate for one thread-scoped call once the writer is connected. Handled: every
 * value is a str whose record is in ``strs`` (key -> {value -> record}, the writer's cache; a
 * hit means the key was validated and the record needs no truncation) and the result fits the
 * entry's limits. Returns
 *   0        the write succeeded and the slot holds what the Python path would leave;
 *   -1       not handled: nothing changed;
 *   errno    the syscall failed: only the value buffer changed (``synced`` is false and
 *            ``filled``/``sdk_in_buf`` describe the buffer), so the Python path can run the
 *            whole call again and decide from the kernel's answer, as it always does.
 * The caller counts the call and the write on 0. The three cases are those of the Python code:
 * the predicted first call of a request (``_annotate_first``), a thread whose entry holds
 * nothing of ours (``_write_new``), and a merge into the current request's entry.
 */
static PyObject *core(Slot *s, PyObject *const *names, PyObject *const *vals, Py_ssize_t n,
                      PyObject *strs)
{
    PyObject *k, *v, *known, *rec;
    PyObject *keys[MAX_ATTRS_CAP], *recs[MAX_ATTRS_CAP];
    Py_ssize_t pos = 0, total = 0, i;
    int holds, err;

    if (!s->bound || n == 0 || n > abi.max_attrs)
        return PyLong_FromLong(NOT_HANDLED);
    for (i = 0; i < n; i++) {
        k = names[i];
        v = vals[i];
        if (!PyUnicode_CheckExact(v))
            return PyLong_FromLong(NOT_HANDLED);
        known = PyDict_GetItemWithError(strs, k);
        if (known == NULL || !PyDict_CheckExact(known))
            goto not_handled;
        rec = PyDict_GetItemWithError(known, v);
        if (rec == NULL && !PyErr_Occurred())
            rec = encode_str(k, v, known);
        if (rec == NULL || !PyBytes_CheckExact(rec))
            goto not_handled;
        keys[i] = k;
        recs[i] = rec;
        total += PyBytes_GET_SIZE(rec);
    }
    holds = PyDict_GET_SIZE(s->mirror) != 0 || s->port != 0 || PyBytes_GET_SIZE(s->sdk) != 0;

    if (!holds || s->req_calls >= s->req_len) {
        /* A new request's entry: these records alone, no bound connection, no SDK span (a
         * thread holding nothing has none either). */
        PyObject *kept, *data;
        int first = holds;
        if (total > abi.attr_bytes)
            return PyLong_FromLong(NOT_HANDLED);
        kept = PyDict_New();
        if (kept == NULL)
            return NULL;
        for (i = 0; i < n; i++) {
            if (PyDict_SetItem(kept, keys[i], recs[i]) < 0) {
                Py_DECREF(kept);
                return NULL;
            }
        }
        data = join(recs, n, total);
        if (data == NULL) {
            Py_DECREF(kept);
            return NULL;
        }
        fill(s, n, PyBytes_AS_STRING(data), total, 0, 0, empty_bytes);
        err = elem_update(&s->a_noexist);
        if (err == 0) {
            if (first) {
                Py_INCREF(empty_bytes);
                Py_SETREF(s->sdk, empty_bytes);
                s->stale = 1;
                s->req_len = s->req_calls;
                s->req_calls = 1;
            } else {
                s->req_calls += 1;
                s->stale = 0;
            }
            set_state(s, kept, data, 0, 0);
        }
        Py_DECREF(kept);
        Py_DECREF(data);
        return PyLong_FromLong(err);
    }

    /* A merge into this request's entry. */
    {
        PyObject *mirror = s->mirror, *merged = NULL, *data = NULL, *old;
        PyObject *all[MAX_ATTRS_CAP];
        Py_ssize_t m, dtotal;

        for (i = 0; i < n; i++) {
            old = PyDict_GetItemWithError(mirror, keys[i]);
            if (old == NULL && PyErr_Occurred())
                return NULL;
            if (old != NULL && bytes_equal(old, recs[i]))
                continue;
            if (merged == NULL) {
                merged = PyDict_Copy(mirror);
                if (merged == NULL)
                    return NULL;
            }
            if (PyDict_SetItem(merged, keys[i], recs[i]) < 0) {
                Py_DECREF(merged);
                return NULL;
            }
        }
        if (merged == NULL && s->synced) {
            /* Repeated values: the buffer already holds this value. */
            err = elem_update(&s->a_exist);
            if (err == 0) {
                s->req_calls += 1;
                s->stale = 0;
            }
            return PyLong_FromLong(err);
        }
        if (merged == NULL) {
            merged = mirror;
            Py_INCREF(merged);
        }
        m = PyDict_GET_SIZE(merged);
        if (m > abi.max_attrs || m > MAX_ATTRS_CAP) {
            Py_DECREF(merged);
            return PyLong_FromLong(NOT_HANDLED);
        }
        /* The block is the merged records in the dict's order, as b"".join(merged.values())
         * builds it: an existing key keeps its place, a new one goes last. */
        pos = 0;
        dtotal = 0;
        i = 0;
        while (PyDict_Next(merged, &pos, &k, &v)) {
            if (!PyBytes_CheckExact(v)) {
                Py_DECREF(merged);
                return PyLong_FromLong(NOT_HANDLED);
            }
            all[i++] = v;
            dtotal += PyBytes_GET_SIZE(v);
        }
        if (dtotal > abi.attr_bytes) {
            Py_DECREF(merged);
            return PyLong_FromLong(NOT_HANDLED);
        }
        data = join(all, m, dtotal);
        if (data == NULL) {
            Py_DECREF(merged);
            return NULL;
        }
        fill(s, m, PyBytes_AS_STRING(data), dtotal, s->trunc, s->port, s->sdk);
        err = elem_update(&s->a_exist);
        if (err == 0) {
            s->req_calls += 1;
            s->stale = 0;
            set_state(s, merged, data, s->trunc, s->port);
        }
        Py_DECREF(merged);
        Py_DECREF(data);
        return PyLong_FromLong(err);
    }

not_handled:
    if (PyErr_Occurred())
        return NULL;
    return PyLong_FromLong(NOT_HANDLED);
}

static PyObject *fast_annotate(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *names[MAX_ATTRS_CAP], *vals[MAX_ATTRS_CAP], *k, *v;
    Py_ssize_t pos = 0, n = 0;
    (void)self;

    if (nargs != 3 || !PyObject_TypeCheck(args[0], &SlotType) || !PyDict_CheckExact(args[1]) ||
        !PyDict_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "annotate(slot, attrs: dict, strs: dict)");
        return NULL;
    }
    if (PyDict_GET_SIZE(args[1]) > abi.max_attrs)
        return PyLong_FromLong(NOT_HANDLED);
    while (PyDict_Next(args[1], &pos, &k, &v)) {
        names[n] = k;
        vals[n] = v;
        n++;
    }
    return core((Slot *)args[0], names, vals, n, args[2]);
}


/* --- the annotate entry ------------------------------------------------------------------ */

/* What sdk_side._writer registers (setup) and keeps current (gate): the state the Python
 * annotate reads before it writes, so that the common call runs no Python code at all. */
static struct {
    PyObject *tls;     /* the writer's threading.local; .s is this thread's Slot */
    PyObject *ctxvar;  /* the task-context ContextVar: set means task scope */
    PyObject *modules; /* sys.modules, to find asyncio once it is imported */
    PyObject *strs;    /* key -> {str value -> record}: the writer's record cache */
    PyObject *get_loop; /* asyncio._get_running_loop, once asyncio is imported */
    PyObject *s_name;  /* "s" */
    PyObject *asyncio_name;
    double deadline;   /* CLOCK_MONOTONIC seconds: after it, the Python path re-checks the pin */
    Py_ssize_t gen;
    int open;          /* connected and no span hook */
    unsigned long long calls; /* calls handled here (each one write) since setup */
} gate;

static PyObject *setup(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"tls", "ctxvar", "modules", "strs", "max_str_len", "per_key_max",
                            "attr_str", NULL};
    PyObject *tls, *ctxvar, *modules, *strs;
    Py_ssize_t max_str_len, per_key_max;
    unsigned attr_str;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "$OOO!O!nnI", names, &tls, &ctxvar,
                                     &PyDict_Type, &modules, &PyDict_Type, &strs, &max_str_len,
                                     &per_key_max, &attr_str))
        return NULL;
    if (!PyContextVar_CheckExact(ctxvar)) {
        PyErr_SetString(PyExc_TypeError, "ctxvar must be a contextvars.ContextVar");
        return NULL;
    }
    if (max_str_len <= 0 || max_str_len > 0xffff || per_key_max <= 0 || attr_str > 255) {
        PyErr_SetString(PyExc_ValueError, "inconsistent string record settings");
        return NULL;
    }
    /* How a str record the cache lacks is built and cached (see encode_str). */
    strenc.max_str_len = max_str_len;
    strenc.per_key_max = per_key_max;
    strenc.attr_str = attr_str;
    strenc.ready = 1;
    if (gate.s_name == NULL) {
        gate.s_name = PyUnicode_InternFromString("s");
        gate.asyncio_name = PyUnicode_InternFromString("asyncio");
        if (gate.s_name == NULL || gate.asyncio_name == NULL)
            return NULL;
    }
    Py_INCREF(tls);
    Py_XSETREF(gate.tls, tls);
    Py_INCREF(ctxvar);
    Py_XSETREF(gate.ctxvar, ctxvar);
    Py_INCREF(modules);
    Py_XSETREF(gate.modules, modules);
    Py_INCREF(strs);
    Py_XSETREF(gate.strs, strs);
    Py_CLEAR(gate.get_loop);
    gate.open = 0;
    gate.deadline = 0.0;
    gate.calls = 0;
    Py_RETURN_NONE;
}

static PyObject *set_gate(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    double deadline;
    Py_ssize_t gen;
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "gate(open, deadline, gen) takes 3 arguments");
        return NULL;
    }
    deadline = PyFloat_AsDouble(args[1]);
    if (deadline == -1.0 && PyErr_Occurred())
        return NULL;
    gen = PyLong_AsSsize_t(args[2]);
    if (gen == -1 && PyErr_Occurred())
        return NULL;
    gate.open = PyObject_IsTrue(args[0]) == 1 && gate.tls != NULL;
    gate.deadline = deadline;
    gate.gen = gen;
    Py_RETURN_NONE;
}

static PyObject *handled_calls(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromUnsignedLongLong(gate.calls);
}

/* This thread's Slot (a new reference) when the writer's own checks would let annotate write
 * now: connected and no span hook (the gate), the pin check not due, no task context, no event
 * loop on this thread, and a Slot for the current map. NULL otherwise; *failed tells an
 * exception from a refusal. */
static Slot *gate_slot(int *failed)
{
    struct timespec ts;
    PyObject *val = NULL, *slot;

    *failed = 0;
    if (!gate.open)
        return NULL;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    if ((double)ts.tv_sec + (double)ts.tv_nsec * 1e-9 >= gate.deadline)
        return NULL;
    if (PyContextVar_Get(gate.ctxvar, Py_None, &val) < 0)
        goto error;
    Py_DECREF(val);
    if (val != Py_None)
        return NULL;
    if (gate.get_loop == NULL) {
        /* No loop can run before asyncio is imported; once it is, ask it on every call. */
        PyObject *aio = PyDict_GetItemWithError(gate.modules, gate.asyncio_name);
        if (aio == NULL && PyErr_Occurred())
            goto error;
        if (aio != NULL) {
            gate.get_loop = PyObject_GetAttrString(aio, "_get_running_loop");
            if (gate.get_loop == NULL)
                goto error;
        }
    }
    if (gate.get_loop != NULL) {
        PyObject *loop = PyObject_CallNoArgs(gate.get_loop);
        if (loop == NULL)
            goto error;
        Py_DECREF(loop);
        if (loop != Py_None)
            return NULL;
    }
    slot = PyObject_GetAttr(gate.tls, gate.s_name);
    if (slot == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            goto error;
        PyErr_Clear();
        return NULL;
    }
    if (!PyObject_TypeCheck(slot, &SlotType) || ((Slot *)slot)->gen != gate.gen) {
        Py_DECREF(slot);
        return NULL;
    }
    return (Slot *)slot;
error:
    *failed = 1;
    return NULL;
}

/* Entry: what sdk_side._writer exports as ``annotate`` when this module is built. Called with
 * keyword arguments only, it makes the writer's checks and its common write without running
 * any Python code and without building the kwargs dict; everything else is passed on, as the
 * very same call, to one of two Python functions: ``declined`` (the full annotate) when the
 * checks refused, ``tried`` (the full annotate minus the C write it just attempted) after the
 * write was not handled or failed. */
typedef struct {
    PyObject_HEAD
    PyObject *declined;
    PyObject *tried;
    vectorcallfunc vectorcall;
} Entry;

static PyObject *entry_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf,
                                  PyObject *kwnames)
{
    Entry *e = (Entry *)self;
    PyObject *fallback = e->declined;
    Py_ssize_t n;

    if (PyVectorcall_NARGS(nargsf) == 0 && kwnames != NULL &&
        (n = PyTuple_GET_SIZE(kwnames)) > 0 && n <= MAX_ATTRS_CAP) {
        int failed;
        Slot *slot = gate_slot(&failed);
        if (slot == NULL && failed)
            return NULL;
        if (slot != NULL) {
            PyObject *res = core(slot, ((PyTupleObject *)kwnames)->ob_item, args, n, gate.strs);
            long rc;
            Py_DECREF(slot);
            if (res == NULL)
                return NULL;
            rc = PyLong_AsLong(res);
            Py_DECREF(res);
            if (rc == 0) {
                gate.calls++;
                Py_RETURN_NONE;
            }
            fallback = e->tried;
        }
    }
    return PyObject_Vectorcall(fallback, args, nargsf, kwnames);
}

static PyObject *entry_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *declined, *tried;
    Entry *e;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "Entry(declined, tried) takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "Entry", 2, 2, &declined, &tried))
        return NULL;
    if (!PyCallable_Check(declined) || !PyCallable_Check(tried)) {
        PyErr_SetString(PyExc_TypeError, "Entry(declined, tried) takes two callables");
        return NULL;
    }
    e = (Entry *)type->tp_alloc(type, 0);
    if (e == NULL)
        return NULL;
    Py_INCREF(declined);
    e->declined = declined;
    Py_INCREF(tried);
    e->tried = tried;
    e->vectorcall = entry_vectorcall;
    return (PyObject *)e;
}

static int entry_traverse(Entry *e, visitproc visit, void *arg)
{
    Py_VISIT(e->declined);
    Py_VISIT(e->tried);
    return 0;
}

static int entry_clear(Entry *e)
{
    Py_CLEAR(e->declined);
    Py_CLEAR(e->tried);
    return 0;
}

static void entry_dealloc(Entry *e)
{
    PyObject_GC_UnTrack(e);
    entry_clear(e);
    Py_TYPE(e)->tp_free((PyObject *)e);
}

/* help(), inspect.signature() and repr() see the documented Python function. */
static PyObject *entry_getattro(PyObject *self, PyObject *name)
{
    Entry *e = (Entry *)self;
    PyObject *r = PyObject_GenericGetAttr(self, name);
    if (r != NULL || !PyErr_ExceptionMatches(PyExc_AttributeError) || e->declined == NULL)
        return r;
    PyErr_Clear();
    return PyObject_GetAttr(e->declined, name);
}

static PyObject *entry_get_doc(Entry *e, void *c)
{
    (void)c;
    return PyObject_GetAttrString(e->declined, "__doc__");
}

static PyObject *entry_get_wrapped(Entry *e, void *c)
{
    (void)c;
    Py_INCREF(e->declined);
    return e->declined;
}

static PyObject *entry_repr(Entry *e)
{
    return PyUnicode_FromFormat("<annotate (C entry) for %R>", e->declined);
}

static PyGetSetDef entry_getset[] = {
    {"__doc__", (getter)entry_get_doc, NULL, NULL, NULL},
    {"__wrapped__", (getter)entry_get_wrapped, NULL, "the Python annotate", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EntryType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sdk_side._fastbpf.Entry",
    .tp_basicsize = sizeof(Entry),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "annotate(**attrs) with the common call in C; see sdk_side._writer.",
    .tp_new = entry_new,
    .tp_dealloc = (destructor)entry_dealloc,
    .tp_traverse = (traverseproc)entry_traverse,
    .tp_clear = (inquiry)entry_clear,
    .tp_vectorcall_offset = offsetof(Entry, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_getattro = entry_getattro,
    .tp_getset = entry_getset,
    .tp_repr = (reprfunc)entry_repr,
};

static PyObject *configure(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"abi_version", "data_off", "sdk_off", "sdk_size", "value_size",
                            "max_attrs", "attr_bytes", "f_truncated", "f_sdk_span", "cells",
                            "cell_bits", "cell_size", "cell_value_off", "cell_hash", NULL};
    unsigned version, ft, fs;
    Py_ssize_t data_off, sdk_off, sdk_size, value_size, max_attrs, attr_bytes;
    Py_ssize_t count, size, value_off;
    int bits;
    unsigned long long hash;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "$InnnnnnIIninnK", names, &version,
                                     &data_off, &sdk_off, &sdk_size, &value_size, &max_attrs,
                                     &attr_bytes, &ft, &fs, &count, &bits, &size, &value_off,
                                     &hash))
        return NULL;
    if (data_off < 8 || sdk_off < 8 || sdk_off + sdk_size > data_off || attr_bytes <= 0 ||
        data_off + attr_bytes != value_size || max_attrs <= 0 || max_attrs > MAX_ATTRS_CAP ||
        max_attrs > 255 || attr_bytes > 0xffff) {
        PyErr_SetString(PyExc_ValueError, "inconsistent context value layout");
        return NULL;
    }
    if (bits <= 0 || bits > 30 || count != ((Py_ssize_t)1 << bits) || value_off < 16 ||
        value_off % 8 != 0 || size != value_off + value_size || size % 8 != 0) {
        PyErr_SetString(PyExc_ValueError, "inconsistent ctx_cells layout");
        return NULL;
    }
    abi.abi_version = version;
    abi.data_off = data_off;
    abi.sdk_off = sdk_off;
    abi.sdk_size = sdk_size;
    abi.value_size = value_size;
    abi.max_attrs = max_attrs;
    abi.attr_bytes = attr_bytes;
    abi.f_truncated = ft;
    abi.f_sdk_span = fs;
    abi.ready = 1;
    cells.count = count;
    cells.bits = bits;
    cells.size = size;
    cells.value_off = value_off;
    cells.hash = hash;
    cells.ready = 1;
    Py_RETURN_NONE;
}

/* map_cells(tid_fd, cells_fd): map ctx_cells through cells_fd (which may be closed afterwards)
 * for writes whose arguments name fd number tid_fd; cells_fd < 0 unmaps. Raises OSError. */
static PyObject *map_cells(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int tid_fd, cells_fd;
    size_t len;
    long page;
    void *base;
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "map_cells(tid_fd, cells_fd) takes 2 arguments");
        return NULL;
    }
    {
        long a = PyLong_AsLong(args[0]), b;
        if (a == -1 && PyErr_Occurred())
            return NULL;
        b = PyLong_AsLong(args[1]);
        if (b == -1 && PyErr_Occurred())
            return NULL;
        if (a < -1 || a > 0x7fffffffL || b < -1 || b > 0x7fffffffL) {
            PyErr_SetString(PyExc_ValueError, "fd numbers must be -1 or non-negative ints");
            return NULL;
        }
        tid_fd = (int)a;
        cells_fd = (int)b;
    }
    if (cells_fd < 0) {
        if (cells.base != NULL)
            munmap(cells.base, cells.len);
        cells.base = NULL;
        cells.len = 0;
        cells.tid_fd = -1;
        Py_RETURN_NONE;
    }
    if (!cells.ready) {
        PyErr_SetString(PyExc_RuntimeError, "_fastbpf.configure() was not called");
        return NULL;
    }
    page = sysconf(_SC_PAGESIZE);
    len = (size_t)cells.count * (size_t)cells.size;
    len = (len + (size_t)page - 1) / (size_t)page * (size_t)page;
    base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, cells_fd, 0);
    if (base == MAP_FAILED)
        return PyErr_SetFromErrno(PyExc_OSError);
    if (cells.base != NULL)
        munmap(cells.base, cells.len);
    cells.base = (unsigned char *)base;
    cells.len = len;
    cells.tid_fd = tid_fd;
    Py_RETURN_NONE;
}

/* release_cell(attr): free the cell of the thread the attr's key names, if it holds one. For a
 * dead thread's state (its thread can no longer use the cell); the probes do the same when a
 * thread exits while an agent runs. */
static PyObject *release_cell(PyObject *self, PyObject *attr)
{
    Py_buffer view;
    unsigned char *cell;
    unsigned zero = 0;
    (void)self;
    if (get_attr_view(attr, &view) < 0)
        return NULL;
    cell = cell_of((const unsigned char *)view.buf);
    PyBuffer_Release(&view);
    if (cell == NULL)
        Py_RETURN_FALSE;
    memcpy(cell + 8, &zero, 4);
    __atomic_store_n((unsigned long long *)cell, 0ULL, __ATOMIC_SEQ_CST);
    Py_RETURN_TRUE;
}

static PyObject *cell_stats(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return Py_BuildValue("(Onn)", cells.base != NULL ? Py_True : Py_False, cells.claimed,
                         cells.taken);
}

static PyMethodDef methods[] = {
    {"map_cells", (PyCFunction)(void (*)(void))map_cells, METH_FASTCALL,
     "map_cells(tid_fd, cells_fd): write thread context to ctx_cells (cells_fd < 0: stop)."},
    {"release_cell", release_cell, METH_O,
     "release_cell(attr) -> bool: free the cell of the thread the attr's key names."},
    {"cell_stats", cell_stats, METH_NOARGS,
     "cell_stats() -> (mapped, cells claimed, cells found held by another thread)."},
    {"update", update, METH_O,
     "update(attr) -> errno: BPF_MAP_UPDATE_ELEM with a 32-byte MapElemAttr; 0 on success."},
    {"delete", delete_, METH_O,
     "delete(attr) -> errno: BPF_MAP_DELETE_ELEM with a 32-byte MapElemAttr; 0 on success."},
    {"annotate", (PyCFunction)(void (*)(void))fast_annotate, METH_FASTCALL,
     "annotate(slot, attrs, strs) -> 0, -1 (not handled) or an errno; see the C source."},
    {"setup", (PyCFunction)(void (*)(void))setup, METH_VARARGS | METH_KEYWORDS,
     "setup(*, tls, ctxvar, modules, strs, max_str_len, per_key_max, attr_str): what Entry\n"
     "reads, and how it encodes a str value the cache lacks; closes the gate."},
    {"gate", (PyCFunction)(void (*)(void))set_gate, METH_FASTCALL,
     "gate(open, deadline, gen): whether Entry may write, until when, for which map."},
    {"handled_calls", handled_calls, METH_NOARGS,
     "handled_calls() -> int: calls Entry completed (one write each) since setup."},
    {"configure", (PyCFunction)(void (*)(void))configure, METH_VARARGS | METH_KEYWORDS,
     "configure(*, abi_version, data_off, sdk_off, sdk_size, value_size, max_attrs,\n"
     "attr_bytes, f_truncated, f_sdk_span, cells, cell_bits, cell_size, cell_value_off,\n"
     "cell_hash): the context value and ctx_cells layouts from bridge._abi."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastbpf",
    "bpf(2) map element commands for the annotate hot path, without ctypes.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastbpf(void)
{
    PyObject *m;
    empty_bytes = PyBytes_FromStringAndSize(NULL, 0);
    if (empty_bytes == NULL || PyType_Ready(&SlotType) < 0 || PyType_Ready(&EntryType) < 0)
        return NULL;
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&SlotType);
    if (PyModule_AddObject(m, "Slot", (PyObject *)&SlotType) < 0) {
        Py_DECREF(&SlotType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&EntryType);
    if (PyModule_AddObject(m, "Entry", (PyObject *)&EntryType) < 0) {
        Py_DECREF(&EntryType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
