/* Optional accelerator for span assembly (kernel_side.assembly).
 *
 * Ids(salt) derives span and trace ids from kernel exchange ids exactly as
 * kernel_side.assembly.IdSource does in Python (and bridge._abi.exchange_span_id /
 * exchange_trace_id, which applications use to name the kernel's server span). Python spends
 * about 0.5 us per span id and 0.9 us per trace id on 64-bit arithmetic with big integers
 * masked back to 64 bits; here it is a few nanoseconds of uint64 arithmetic and one bytes
 * object. tests/unit/test_fastspan.py compares both on random and edge-case inputs.
 *
 * server_attrs(...) builds the attributes of an HTTP/1 server span, the same dict in the same
 * insertion order as SpanAssembler._http's Python code (server_attrs_py there is the reference
 * and tests/unit/test_fastspan.py compares both). It returns None, touching nothing, for a
 * request with X-Forwarded-For: taking the first address of that list is left to Python.
 *
 * Decoder(...).decode_packed(data) turns an EV_EXCHANGE_PACKED ring-buffer event into a
 * kernel_side.events.Exchange exactly as ExchangeLayout.decode_packed_py does (the reference;
 * tests/unit/test_fastspan.py compares both), about a microsecond less per event: the header
 * read without struct, the addresses through the same cache, the slots set directly.
 *
 * Inputs are taken modulo 2**64 (PyLong_AsUnsignedLongLongMask), which is what the Python
 * code's "& _MASK64" does for the non-negative ids the kernel hands out. Anything that is not
 * an int raises TypeError, as the Python arithmetic would.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>

#include "_slots.h"

#define GOLDEN 0x9E3779B97F4A7C15ULL

/* splitmix64's finaliser (bridge._abi.mix64). */
static inline uint64_t mix64(uint64_t x)
{
    x += GOLDEN;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

static inline void put_be64(unsigned char *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        p[i] = (unsigned char)v;
        v >>= 8;
    }
}

typedef struct {
    PyObject_HEAD
    uint64_t s1, s2, s3;
} IdsObject;

static int arg_u64(PyObject *o, uint64_t *out)
{
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "expected an int, got %.100s", Py_TYPE(o)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLongMask(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *out = (uint64_t)v;
    return 0;
}

/* (exchange_id, index=0) -> the 64-bit key ((exchange_id << 16) | (index & 0xFFFF)). */
static int exchange_key(PyObject *const *args, Py_ssize_t nargs, const char *name, uint64_t *key)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_Format(PyExc_TypeError, "%s() takes 1 or 2 arguments (%zd given)", name, nargs);
        return -1;
    }
    uint64_t ex, idx = 0;
    if (arg_u64(args[0], &ex) < 0 || (nargs == 2 && arg_u64(args[1], &idx) < 0))
        return -1;
    *key = (ex << 16) | (idx & 0xFFFF);
    return 0;
}

static PyObject *two_args(PyObject *const *args, Py_ssize_t nargs, const char *name,
                          uint64_t *a, uint64_t *b)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s() takes 2 arguments (%zd given)", name, nargs);
        return NULL;
    }
    if (arg_u64(args[0], a) < 0 || arg_u64(args[1], b) < 0)
        return NULL;
    return Py_None; /* borrowed: only a success marker */
}

static PyObject *id8(uint64_t v)
{
    unsigned char buf[8];
    put_be64(buf, v);
    return PyBytes_FromStringAndSize((const char *)buf, 8);
}

static PyObject *id16(uint64_t hi, uint64_t lo)
{
    unsigned char buf[16];
    put_be64(buf, hi);
    put_be64(buf + 8, lo);
    return PyBytes_FromStringAndSize((const char *)buf, 16);
}

static PyObject *Ids_span_id(IdsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t key;
    if (exchange_key(args, nargs, "span_id", &key) < 0)
        return NULL;
    uint64_t v = mix64(self->s1 ^ key);
    return id8(v ? v : 1);
}

static PyObject *Ids_trace_id(IdsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t key;
    if (exchange_key(args, nargs, "trace_id", &key) < 0)
        return NULL;
    uint64_t lo = mix64(self->s3 ^ key);
    return id16(mix64(self->s2 ^ key), lo ? lo : 1);
}

static PyObject *Ids_stream_span_id(IdsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t conn, stream;
    if (two_args(args, nargs, "stream_span_id", &conn, &stream) == NULL)
        return NULL;
    uint64_t v = mix64(self->s1 ^ mix64(conn ^ 0x5EED) ^ stream);
    return id8(v ? v : 1);
}

static PyObject *Ids_stream_trace_id(IdsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t conn, stream;
    if (two_args(args, nargs, "stream_trace_id", &conn, &stream) == NULL)
        return NULL;
    uint64_t key = mix64(conn ^ 0xFEED) ^ stream;
    uint64_t lo = mix64(self->s3 ^ key);
    return id16(mix64(self->s2 ^ key), lo ? lo : 1);
}

static uint64_t le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static int Ids_init(IdsObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"salt", NULL};
    Py_buffer salt;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*:Ids", kwlist, &salt))
        return -1;
    if (salt.len < 24) {
        PyErr_Format(PyExc_ValueError, "Ids: the salt needs 24 bytes, got %zd", salt.len);
        PyBuffer_Release(&salt);
        return -1;
    }
    const unsigned char *p = salt.buf;
    self->s1 = le64(p);
    self->s2 = le64(p + 8);
    self->s3 = le64(p + 16);
    PyBuffer_Release(&salt);
    return 0;
}

static PyMethodDef Ids_methods[] = {
    {"span_id", (PyCFunction)(void (*)(void))Ids_span_id, METH_FASTCALL,
     "span_id(exchange_id, index=0) -> bytes: IdSource.span_id."},
    {"trace_id", (PyCFunction)(void (*)(void))Ids_trace_id, METH_FASTCALL,
     "trace_id(exchange_id, index=0) -> bytes: IdSource.trace_id."},
    {"stream_span_id", (PyCFunction)(void (*)(void))Ids_stream_span_id, METH_FASTCALL,
     "stream_span_id(conn_id, stream_id) -> bytes: IdSource.stream_span_id."},
    {"stream_trace_id", (PyCFunction)(void (*)(void))Ids_stream_trace_id, METH_FASTCALL,
     "stream_trace_id(conn_id, stream_id) -> bytes: IdSource.stream_trace_id."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject IdsType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kernel_side._fastspan.Ids",
    .tp_basicsize = sizeof(IdsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Ids(salt): IdSource's id derivation for the 24-byte salt ``salt``.",
    .tp_methods = Ids_methods,
    .tp_init = (initproc)Ids_init,
    .tp_new = PyType_GenericNew,
};

/* ---- HTTP/1 server span attributes ------------------------------------------------------ */

/* Attribute keys, from kernel_side.semconv through configure(): the names exist once. */
enum {
    K_METHOD, K_VERSION, K_STATUS, K_RESP_BODY, K_ERROR_TYPE, K_REQ_BODY, K_USER_AGENT,
    K_PEER_ADDRESS, K_PEER_PORT, K_TRUNCATED, K_CTX_TRUNCATED, K_URL_PATH, K_URL_QUERY,
    K_URL_SCHEME, K_TLS_PROTOCOL, K_SERVER_PORT, K_SERVER_ADDRESS, K_CLIENT_ADDRESS, N_KEYS
};
static PyObject *keys[N_KEYS];
static PyObject *s_method, *s_version, *s_status, *s_body_size, *s_user_agent, *s_path,
    *s_query, *s_xff, *v_https, *v_http, *v_tls, *v_500;

static PyObject *configure(PyObject *self, PyObject *arg)
{
    (void)self;
    if (!PyTuple_Check(arg) || PyTuple_GET_SIZE(arg) != N_KEYS) {
        PyErr_Format(PyExc_TypeError, "configure() takes a tuple of %d attribute keys", N_KEYS);
        return NULL;
    }
    for (int i = 0; i < N_KEYS; i++) {
        PyObject *k = PyTuple_GET_ITEM(arg, i);
        if (!PyUnicode_CheckExact(k)) {
            PyErr_SetString(PyExc_TypeError, "configure(): attribute keys must be str");
            return NULL;
        }
        Py_INCREF(k);
        Py_XSETREF(keys[i], k);
    }
    Py_RETURN_NONE;
}

/* attrs[key] = value, consuming the reference to value. */
static int put_new(PyObject *attrs, int key, PyObject *value)
{
    if (value == NULL)
        return -1;
    int rc = PyDict_SetItem(attrs, keys[key], value);
    Py_DECREF(value);
    return rc;
}

static int put(PyObject *attrs, int key, PyObject *value)
{
    return PyDict_SetItem(attrs, keys[key], value);
}

/* Sets *truthy to the truth of attribute name of o and returns a new reference to it. */
static PyObject *get_truth(PyObject *o, PyObject *name, int *truthy)
{
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == NULL)
        return NULL;
    *truthy = PyObject_IsTrue(v);
    if (*truthy < 0) {
        Py_DECREF(v);
        return NULL;
    }
    return v;
}

/* server_attrs(req, resp, peer_address, peer_port, tls, local_port, host, truncated,
 *              ctx_truncated, business) -> (attrs, is_error) | None */
static PyObject *server_attrs(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 10) {
        PyErr_Format(PyExc_TypeError, "server_attrs() takes 10 arguments (%zd given)", nargs);
        return NULL;
    }
    if (keys[0] == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "server_attrs(): configure() was not called");
        return NULL;
    }
    PyObject *req = args[0], *resp = args[1], *peer_address = args[2], *peer_port = args[3];
    PyObject *local_port = args[5], *host = args[6], *business = args[9];
    int tls = PyObject_IsTrue(args[4]), truncated = PyObject_IsTrue(args[7]);
    int ctx_truncated = PyObject_IsTrue(args[8]);
    if (tls < 0 || truncated < 0 || ctx_truncated < 0)
        return NULL;
    if (!PyDict_Check(business)) {
        PyErr_SetString(PyExc_TypeError, "server_attrs(): business must be a dict");
        return NULL;
    }
    int t;
    PyObject *xff = get_truth(req, s_xff, &t);
    if (xff == NULL)
        return NULL;
    Py_DECREF(xff);
    if (t)
        Py_RETURN_NONE;

    /* Sized for the dozen attributes of a plain span and a few business ones: grown from
     * empty, the dict was allocated three times and rehashed twice on the way to 12 keys. */
#if PY_VERSION_HEX < 0x030D0000
    PyObject *attrs = _PyDict_NewPresized(16), *v = NULL;
#else /* private API that later Pythons may not export: the plain call */
    PyObject *attrs = PyDict_New(), *v = NULL;
#endif
    int is_error = 0;
    if (attrs == NULL)
        return NULL;
    if (put_new(attrs, K_METHOD, PyObject_GetAttr(req, s_method)) < 0 ||
        put_new(attrs, K_VERSION, PyObject_GetAttr(req, s_version)) < 0)
        goto fail;
    if (resp != Py_None) {
        PyObject *status = PyObject_GetAttr(resp, s_status);
        if (status == NULL || put(attrs, K_STATUS, status) < 0) {
            Py_XDECREF(status);
            goto fail;
        }
        v = PyObject_GetAttr(resp, s_body_size);
        if (v == NULL || (v != Py_None && put(attrs, K_RESP_BODY, v) < 0)) {
            Py_DECREF(status);
            goto fail;
        }
        Py_CLEAR(v);
        /* resp.status >= 500 (a server span: 4xx is the client's error) */
        int ge = PyObject_RichCompareBool(status, v_500, Py_GE);
        if (ge < 0 || (ge && put_new(attrs, K_ERROR_TYPE, PyObject_Str(status)) < 0)) {
            Py_DECREF(status);
            goto fail;
        }
        is_error = ge;
        Py_DECREF(status);
    }
    v = PyObject_GetAttr(req, s_body_size);
    if (v == NULL || (v != Py_None && put(attrs, K_REQ_BODY, v) < 0))
        goto fail;
    Py_CLEAR(v);
    v = get_truth(req, s_user_agent, &t);
    if (v == NULL || (t && put(attrs, K_USER_AGENT, v) < 0))
        goto fail;
    Py_CLEAR(v);
    int has_peer = PyObject_IsTrue(peer_address);
    if (has_peer < 0)
        goto fail;
    if (has_peer && (put(attrs, K_PEER_ADDRESS, peer_address) < 0 ||
                     put(attrs, K_PEER_PORT, peer_port) < 0))
        goto fail;
    if (truncated && put(attrs, K_TRUNCATED, Py_True) < 0)
        goto fail;
    if (ctx_truncated && put(attrs, K_CTX_TRUNCATED, Py_True) < 0)
        goto fail;
    if (PyDict_Update(attrs, business) < 0)
        goto fail;
    /* SpanAssembler._http_server_attrs */
    if (put_new(attrs, K_URL_PATH, PyObject_GetAttr(req, s_path)) < 0)
        goto fail;
    v = get_truth(req, s_query, &t);
    if (v == NULL || (t && put(attrs, K_URL_QUERY, v) < 0))
        goto fail;
    Py_CLEAR(v);
    if (put(attrs, K_URL_SCHEME, tls ? v_https : v_http) < 0)
        goto fail;
    if (tls && put(attrs, K_TLS_PROTOCOL, v_tls) < 0)
        goto fail;
    if (local_port != Py_None && put(attrs, K_SERVER_PORT, local_port) < 0)
        goto fail;
    t = PyObject_IsTrue(host);
    if (t < 0 || (t && put(attrs, K_SERVER_ADDRESS, host) < 0))
        goto fail;
    if (has_peer && put(attrs, K_CLIENT_ADDRESS, peer_address) < 0)
        goto fail;
    PyObject *out = PyTuple_New(2);
    if (out == NULL)
        goto fail;
    PyTuple_SET_ITEM(out, 0, attrs);
    PyTuple_SET_ITEM(out, 1, PyBool_FromLong(is_error));
    return out;
fail:
    Py_XDECREF(v);
    Py_DECREF(attrs);
    return NULL;
}

/* ---- EV_EXCHANGE_PACKED decoder -------------------------------------------------------- */

/* The header fields of the packed event, in kernel_side.events._HEADER_FIELDS order (without
 * the trailing ctx). */
enum {
    F_TYPE, F_TGID, F_FD, F_ROLE, F_FAMILY, F_PHASE, F_HAS_CTX, F_PEER_PORT, F_LISTEN_FD,
    F_REQ_TID, F_RESP_TID, F_REQ_CAP, F_RESP_CAP, F_REQ_CALLS, F_RESP_CALLS, F_PEER_ADDR,
    F_CONN_ID, F_EXCHANGE_ID, F_PARENT_ID, F_REQ_START, F_REQ_END, F_RESP_START, F_RESP_END,
    F_REQ_BYTES, F_RESP_BYTES, F_LOCAL_ADDR, F_LOCAL_PORT, F_PEER_TRACED, F_TLS, N_FIELDS
};

/* The Exchange fields, in the dataclass's order. */
enum {
    E_TGID, E_FD, E_ROLE, E_PEER_ADDRESS, E_PEER_PORT, E_LISTEN_FD, E_REQ_TID, E_RESP_TID,
    E_CONN_ID, E_EXCHANGE_ID, E_PARENT_ID, E_REQ_START, E_REQ_END, E_RESP_START, E_RESP_END,
    E_REQ_BYTES, E_RESP_BYTES, E_REQ_CALLS, E_RESP_CALLS, E_REQUEST, E_RESPONSE, E_CTX,
    E_LOCAL_ADDRESS, E_LOCAL_PORT, E_PEER_TRACED, E_TLS, E_CLOSED, N_SLOTS
};
static const char *const slot_names[N_SLOTS] = {
    "tgid", "fd", "role", "peer_address", "peer_port", "listen_fd", "req_tid", "resp_tid",
    "conn_id", "exchange_id", "parent_exchange_id", "req_start_ns", "req_end_ns",
    "resp_start_ns", "resp_end_ns", "req_bytes", "resp_bytes", "req_calls", "resp_calls",
    "request", "response", "ctx", "local_address", "local_port", "peer_traced", "tls", "closed",
};

typedef struct {
    PyObject_HEAD
    PyTypeObject *cls;        /* kernel_side.events.Exchange */
    Py_ssize_t slot_off[N_SLOTS];
    Py_ssize_t off[N_FIELDS];
    int size[N_FIELDS];       /* 1, 2, 4 or 8: an unsigned little-endian int; else bytes */
    Py_ssize_t header_size, packed_off, ctx_size;
    unsigned long long phase_closed;
    PyObject *format_addr;    /* events._format_addr: fills the cache on a miss */
    PyObject *cache;          /* events._ADDR_CACHE: (family, raw) -> str | None */
    PyObject *fallback;       /* ExchangeLayout.decode_packed_py, for anything unusual */
    /* The last peer and local address formatted (an address's text never changes): most
     * events repeat them, so most skip the cache's key tuple too. */
    unsigned char memo_raw[2][16];
    unsigned long long memo_family[2];
    PyObject *memo_text[2];
} DecoderObject;

static unsigned long long get_le(const unsigned char *p, int size)
{
    unsigned long long v = 0;
    for (int i = size - 1; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static int Decoder_init(DecoderObject *self, PyObject *args, PyObject *kwds)
{
    PyObject *cls, *spec, *fmt, *cache, *fallback;
    Py_ssize_t packed_off, ctx_size;
    unsigned long long phase_closed;
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "Decoder() takes no keyword arguments");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "O!OnnKOO!O:Decoder", &PyType_Type, &cls, &spec, &packed_off,
                          &ctx_size, &phase_closed, &fmt, &PyDict_Type, &cache, &fallback))
        return -1;
    PyTypeObject *type = (PyTypeObject *)cls;
    if (PyObject_HasAttrString(cls, "__post_init__")) {
        PyErr_SetString(PyExc_TypeError, "Decoder(): the record type has a __post_init__");
        return -1;
    }
    for (int i = 0; i < N_SLOTS; i++) {
        PyObject *d = PyObject_GetAttrString(cls, slot_names[i]);
        if (d == NULL)
            return -1;
        int ok = Py_IS_TYPE(d, &PyMemberDescr_Type) &&
                 ((PyMemberDescrObject *)d)->d_member->type == T_OBJECT_EX;
        if (ok)
            self->slot_off[i] = ((PyMemberDescrObject *)d)->d_member->offset;
        Py_DECREF(d);
        if (!ok) {
            PyErr_Format(PyExc_TypeError, "Decoder(): %.100s.%s is not a slot", type->tp_name,
                         slot_names[i]);
            return -1;
        }
    }
    PyObject *seq = PySequence_Fast(spec, "Decoder(): fields must be a sequence");
    if (seq == NULL)
        return -1;
    if (PySequence_Fast_GET_SIZE(seq) != N_FIELDS) {
        PyErr_Format(PyExc_ValueError, "Decoder(): expected %d fields, got %zd", N_FIELDS,
                     PySequence_Fast_GET_SIZE(seq));
        Py_DECREF(seq);
        return -1;
    }
    Py_ssize_t end = 0;
    for (int i = 0; i < N_FIELDS; i++) {
        Py_ssize_t off;
        int size;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "ni", &off, &size)) {
            Py_DECREF(seq);
            return -1;
        }
        int addr = i == F_PEER_ADDR || i == F_LOCAL_ADDR;
        if (off < 0 || (addr ? size != 16 : (size != 1 && size != 2 && size != 4 && size != 8))) {
            PyErr_Format(PyExc_ValueError, "Decoder(): field %d has offset %zd size %d", i, off,
                         size);
            Py_DECREF(seq);
            return -1;
        }
        self->off[i] = off;
        self->size[i] = size;
        if (off + size > end)
            end = off + size;
    }
    Py_DECREF(seq);
    self->header_size = end;
    self->packed_off = packed_off;
    self->ctx_size = ctx_size;
    self->phase_closed = phase_closed;
    Py_INCREF(cls);
    Py_XSETREF(self->cls, type);
    Py_INCREF(fmt);
    Py_XSETREF(self->format_addr, fmt);
    Py_INCREF(cache);
    Py_XSETREF(self->cache, cache);
    Py_INCREF(fallback);
    Py_XSETREF(self->fallback, fallback);
    return 0;
}

static void Decoder_dealloc(DecoderObject *self)
{
    Py_XDECREF(self->cls);
    Py_XDECREF(self->format_addr);
    Py_XDECREF(self->cache);
    Py_XDECREF(self->fallback);
    Py_XDECREF(self->memo_text[0]);
    Py_XDECREF(self->memo_text[1]);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* events._format_addr(family, raw): the memo, the shared cache, else the Python formatter. */
static PyObject *format_addr_cached(DecoderObject *self, PyObject *family,
                                    const unsigned char *raw);

static PyObject *format_addr(DecoderObject *self, int which, unsigned long long fam,
                             PyObject *family, const unsigned char *raw)
{
    if (self->memo_text[which] != NULL && self->memo_family[which] == fam &&
        memcmp(self->memo_raw[which], raw, 16) == 0)
        return Py_NewRef(self->memo_text[which]);
    PyObject *text = format_addr_cached(self, family, raw);
    if (text != NULL) {
        memcpy(self->memo_raw[which], raw, 16);
        self->memo_family[which] = fam;
        Py_XSETREF(self->memo_text[which], Py_NewRef(text));
    }
    return text;
}

static PyObject *format_addr_cached(DecoderObject *self, PyObject *family,
                                    const unsigned char *raw)
{
    PyObject *b = PyBytes_FromStringAndSize((const char *)raw, 16);
    if (b == NULL)
        return NULL;
    PyObject *key = PyTuple_Pack(2, family, b);
    if (key == NULL) {
        Py_DECREF(b);
        return NULL;
    }
    PyObject *text = PyDict_GetItemWithError(self->cache, key);
    Py_DECREF(key);
    if (text != NULL) {
        Py_DECREF(b);
        return Py_NewRef(text);
    }
    if (PyErr_Occurred()) {
        Py_DECREF(b);
        return NULL;
    }
    PyObject *argv[2] = {family, b};
    text = PyObject_Vectorcall(self->format_addr, argv, 2, NULL);
    Py_DECREF(b);
    return text;
}

static PyObject *slice(const char *d, Py_ssize_t n, Py_ssize_t from, Py_ssize_t to)
{
    /* data[from:to] for non-negative bounds: clamped, as Python slices are. */
    if (from > n)
        from = n;
    if (to > n)
        to = n;
    if (to < from)
        to = from;
    return PyBytes_FromStringAndSize(d + from, to - from);
}

static PyObject *Decoder_decode_packed(DecoderObject *self, PyObject *data)
{
    if (self->cls == NULL || !PyBytes_CheckExact(data) ||
        PyBytes_GET_SIZE(data) < self->header_size)
        return PyObject_CallOneArg(self->fallback, data);
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    unsigned long long v[N_FIELDS];
    for (int i = 0; i < N_FIELDS; i++)
        v[i] = (i == F_PEER_ADDR || i == F_LOCAL_ADDR) ? 0 : get_le(d + self->off[i], self->size[i]);
    PyObject *slots[N_SLOTS] = {NULL};
    PyObject *family = NULL, *out = NULL;
    static const struct { int slot, field; } ints[] = {
        {E_TGID, F_TGID}, {E_FD, F_FD}, {E_ROLE, F_ROLE}, {E_PEER_PORT, F_PEER_PORT},
        {E_LISTEN_FD, F_LISTEN_FD}, {E_REQ_TID, F_REQ_TID}, {E_RESP_TID, F_RESP_TID},
        {E_CONN_ID, F_CONN_ID}, {E_EXCHANGE_ID, F_EXCHANGE_ID}, {E_PARENT_ID, F_PARENT_ID},
        {E_REQ_START, F_REQ_START}, {E_REQ_END, F_REQ_END}, {E_RESP_START, F_RESP_START},
        {E_RESP_END, F_RESP_END}, {E_REQ_BYTES, F_REQ_BYTES}, {E_RESP_BYTES, F_RESP_BYTES},
        {E_REQ_CALLS, F_REQ_CALLS}, {E_RESP_CALLS, F_RESP_CALLS}, {E_LOCAL_PORT, F_LOCAL_PORT},
    };
    for (size_t i = 0; i < sizeof(ints) / sizeof(ints[0]); i++)
        if ((slots[ints[i].slot] = PyLong_FromUnsignedLongLong(v[ints[i].field])) == NULL)
            goto done;
    if ((family = PyLong_FromUnsignedLongLong(v[F_FAMILY])) == NULL)
        goto done;
    if ((slots[E_PEER_ADDRESS] = format_addr(self, 0, v[F_FAMILY], family,
                                             d + self->off[F_PEER_ADDR])) == NULL)
        goto done;
    slots[E_LOCAL_ADDRESS] = v[F_LOCAL_PORT]
        ? format_addr(self, 1, v[F_FAMILY], family, d + self->off[F_LOCAL_ADDR])
        : Py_NewRef(Py_None);
    if (slots[E_LOCAL_ADDRESS] == NULL)
        goto done;
    /* Offsets in Python's unbounded ints: caps are u32, so no overflow in Py_ssize_t. */
    Py_ssize_t req_off = self->packed_off;
    Py_ssize_t resp_off = req_off + (Py_ssize_t)v[F_REQ_CAP];
    Py_ssize_t ctx_off = resp_off + (Py_ssize_t)v[F_RESP_CAP];
    const char *c = (const char *)d;
    if ((slots[E_REQUEST] = slice(c, n, req_off, resp_off)) == NULL ||
        (slots[E_RESPONSE] = slice(c, n, resp_off, ctx_off)) == NULL)
        goto done;
    slots[E_CTX] = v[F_HAS_CTX] ? slice(c, n, ctx_off, ctx_off + self->ctx_size)
                                : Py_NewRef(Py_None);
    if (slots[E_CTX] == NULL)
        goto done;
    slots[E_PEER_TRACED] = PyBool_FromLong(v[F_PEER_TRACED] != 0);
    slots[E_TLS] = PyBool_FromLong(v[F_TLS] != 0);
    slots[E_CLOSED] = PyBool_FromLong(v[F_PHASE] == self->phase_closed);
    /* Every slot set directly: the dataclass's __init__ only assigns them (checked for
     * __post_init__ at construction), and it is a third of the Python decoder's time. */
    out = self->cls->tp_alloc(self->cls, 0);
    if (out == NULL)
        goto done;
    for (int i = 0; i < N_SLOTS; i++) {
        *(PyObject **)((char *)out + self->slot_off[i]) = slots[i];
        slots[i] = NULL;
    }
done:
    Py_XDECREF(family);
    for (int i = 0; i < N_SLOTS; i++)
        Py_XDECREF(slots[i]);
    return out;
}

static PyMethodDef Decoder_methods[] = {
    {"decode_packed", (PyCFunction)Decoder_decode_packed, METH_O,
     "decode_packed(data) -> Exchange: ExchangeLayout.decode_packed_py's result."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject DecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kernel_side._fastspan.Decoder",
    .tp_basicsize = sizeof(DecoderObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Decoder(Exchange, fields, packed_off, ctx_size, phase_closed, format_addr,\n"
              "cache, fallback): ExchangeLayout's packed-event decoder.",
    .tp_methods = Decoder_methods,
    .tp_init = (initproc)Decoder_init,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)Decoder_dealloc,
};

/* -- SpanRecord for an HTTP/1 server span ------------------------------------------------- */

static slot_maker span_maker;
static PyObject *span_cls, *kind_server, *empty_bytes, *empty_str;

static PyObject *configure_spans(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *cls, *kind;
    if (!PyArg_ParseTuple(args, "OO:configure_spans", &cls, &kind))
        return NULL;
    slot_maker_clear(&span_maker);
    if (slot_maker_init(&span_maker, cls, 11) < 0)
        return NULL;
    Py_XSETREF(span_cls, Py_NewRef(cls));
    Py_XSETREF(kind_server, Py_NewRef(kind));
    return PyBool_FromLong(span_maker.type != NULL);
}

/* server_span(span_id, name, start_ns, end_ns, resource, attributes, status): what
 * SpanRecord(b"", span_id, None, name, SpanKind.SERVER, start_ns, end_ns, resource,
 * attributes, status) makes, without the dataclass __init__ frame when the slots allow. */
static PyObject *server_span(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 7 || span_cls == NULL) {
        PyErr_SetString(PyExc_TypeError, span_cls == NULL
                                             ? "server_span(): call configure_spans() first"
                                             : "server_span() takes 7 arguments");
        return NULL;
    }
    PyObject *full[11] = {empty_bytes, args[0], Py_None, args[1], kind_server, args[2],
                          args[3], args[4], args[5], args[6], empty_str};
    if (span_maker.type != NULL)
        return slot_make(&span_maker, full);
    return PyObject_Vectorcall(span_cls, full, 11, NULL);
}

static PyMethodDef methods[] = {
    {"configure_spans", (PyCFunction)configure_spans, METH_VARARGS,
     "configure_spans(SpanRecord, SpanKind.SERVER) -> bool: set up server_span(); True when\n"
     "it stores the slots directly (False: it calls the class)."},
    {"server_span", (PyCFunction)(void (*)(void))server_span, METH_FASTCALL,
     "server_span(span_id, name, start_ns, end_ns, resource, attributes, status) -> SpanRecord\n"
     "of kind SERVER with an empty trace id, no parent and no status message."},
    {"configure", (PyCFunction)configure, METH_O,
     "configure(keys): the attribute keys server_attrs() writes, in kernel_side.assembly's\n"
     "_FAST_KEYS order."},
    {"server_attrs", (PyCFunction)(void (*)(void))server_attrs, METH_FASTCALL,
     "server_attrs(req, resp, peer_address, peer_port, tls, local_port, host, truncated,\n"
     "ctx_truncated, business) -> (attrs, is_error) | None: server_attrs_py's result."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastspan",
    "Span assembly's ids, HTTP/1 server attributes and packed-event decoder in C.",
    -1, methods, NULL, NULL, NULL, NULL,
};

static int intern(PyObject **slot, const char *text)
{
    *slot = PyUnicode_InternFromString(text);
    return *slot == NULL ? -1 : 0;
}

PyMODINIT_FUNC PyInit__fastspan(void)
{
    if (PyType_Ready(&IdsType) < 0 || PyType_Ready(&DecoderType) < 0)
        return NULL;
    if (intern(&s_method, "method") < 0 || intern(&s_version, "version") < 0 ||
        intern(&s_status, "status") < 0 || intern(&s_body_size, "body_size") < 0 ||
        intern(&s_user_agent, "user_agent") < 0 || intern(&s_path, "path") < 0 ||
        intern(&s_query, "query") < 0 || intern(&s_xff, "x_forwarded_for") < 0 ||
        intern(&v_https, "https") < 0 || intern(&v_http, "http") < 0 ||
        intern(&v_tls, "tls") < 0)
        return NULL;
    if ((v_500 = PyLong_FromLong(500)) == NULL ||
        (empty_bytes = PyBytes_FromStringAndSize("", 0)) == NULL ||
        (empty_str = PyUnicode_New(0, 0)) == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&IdsType);
    if (PyModule_AddObject(m, "Ids", (PyObject *)&IdsType) < 0) {
        Py_DECREF(&IdsType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&DecoderType);
    if (PyModule_AddObject(m, "Decoder", (PyObject *)&DecoderType) < 0) {
        Py_DECREF(&DecoderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
