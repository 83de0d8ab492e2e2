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
 * Inputs are taken modulo 2**64 (PyLong_AsUnsignedLongLongMask), which is what the Python
 * code's "& _MASK64" does for the non-negative ids the kernel hands out. Anything that is not
 * an int raises TypeError, as the Python arithmetic would.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

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
    *s_query, *s_xff, *v_https, *v_http, *v_tls;

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

    PyObject *attrs = PyDict_New(), *v = NULL;
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
        PyObject *limit = PyLong_FromLong(500);
        int ge = limit == NULL ? -1 : PyObject_RichCompareBool(status, limit, Py_GE);
        Py_XDECREF(limit);
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

static PyMethodDef methods[] = {
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
    "Span assembly's id derivation and HTTP/1 server attributes in C (see kernel_side.assembly).",
    -1, methods, NULL, NULL, NULL, NULL,
};

static int intern(PyObject **slot, const char *text)
{
    *slot = PyUnicode_InternFromString(text);
    return *slot == NULL ? -1 : 0;
}

PyMODINIT_FUNC PyInit__fastspan(void)
{
    if (PyType_Ready(&IdsType) < 0)
        return NULL;
    if (intern(&s_method, "method") < 0 || intern(&s_version, "version") < 0 ||
        intern(&s_status, "status") < 0 || intern(&s_body_size, "body_size") < 0 ||
        intern(&s_user_agent, "user_agent") < 0 || intern(&s_path, "path") < 0 ||
        intern(&s_query, "query") < 0 || intern(&s_xff, "x_forwarded_for") < 0 ||
        intern(&v_https, "https") < 0 || intern(&v_http, "http") < 0 ||
        intern(&v_tls, "tls") < 0)
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
    return m;
}
