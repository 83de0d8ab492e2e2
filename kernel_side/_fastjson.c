/* Optional accelerator for the OTLP/JSON line writer (kernel_side.export.otlp_json).
 *
 * otlp_json_line_py costs about 7 us per span on the 2-core VM, most of the agent's 10 us
 * budget when the JSONL sink is in use. This module writes the same line in C, byte for byte:
 * what orjson.dumps(to_otlp_json(spans)) + b"\n" gives.
 *
 * It writes itself the records real traffic has: exact SpanRecord and Resource instances whose
 * ids are bytes, name and status message str, kind and status their enums (or int/bool),
 * times int, attributes dicts. The attribute values it writes are str, int, bool and float of
 * the exact types. Everything else goes to Python, so every rare rule exists once, there:
 *
 *   - an attribute whose key is not an exact str or whose value is of another type (a str
 *     subclass, an IntEnum, None, ...) is written by otlp_json._kv_bytes, which applies the
 *     Python writer's isinstance chain and shares its cache;
 *   - a finite float is formatted by orjson.dumps itself (its shortest-digits notation differs
 *     from repr: 1e-05 is "0.00001", 1e-07 is "1e-7");
 *   - any other odd field, a string with a lone surrogate (orjson refuses it), a container
 *     that is not a list or tuple, or an Exception raised by Python code called on the way
 *     sends the whole batch to otlp_json_line_py, which then returns or raises exactly what it
 *     always did. Spans are written grouped by resource, not in input order, so a partial
 *     result or the first error seen here would not be the Python's.
 *
 * tests/unit/test_otlp_json_fast.py holds the two to identical bytes on random batches.
 *
 * Python code can run while a batch is written (orjson, __str__, __hash__ of a resource key,
 * the _kv_bytes helper), so the batch is held as a tuple and every object used across such a
 * call is held by a strong reference.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#define FALLBACK (-2)

/* SpanRecord slots read here, in configure()'s order. */
enum {
    F_TRACE_ID, F_SPAN_ID, F_PARENT, F_NAME, F_KIND, F_START, F_END, F_RESOURCE, F_ATTRS,
    F_STATUS, F_MESSAGE, F_N
};
static const char *const span_fields[F_N] = {
    "trace_id", "span_id", "parent_span_id", "name", "kind", "start_ns", "end_ns", "resource",
    "attributes", "status", "status_message",
};
enum { R_KEY, R_ATTRS, R_N };
static const char *const resource_fields[R_N] = {"key", "attributes"};

static Py_ssize_t span_off[F_N], resource_off[R_N];
static PyTypeObject *span_cls, *resource_cls, *kind_cls, *status_cls;
static PyObject *status_unset, *line_py, *kv_py, *envelope_py, *dumps_py;
/* Batches written here, batches handed to otlp_json_line_py, and attributes handed to
 * _kv_bytes: for tests and diagnostics. */
static unsigned long long n_fast, n_fallback, n_delegated;

/* JSON escapes as orjson writes them: the character after the backslash, 'u' for \u00XX
 * (lowercase hex), 0 for a byte written as is. Only '"', '\\' and C0 controls are escaped;
 * DEL, '/' and non-ASCII are not. */
static char escape[128];
static const char hexdigits[] = "0123456789abcdef";

static inline PyObject *slot(PyObject *obj, Py_ssize_t off)
{
    return *(PyObject **)((char *)obj + off);
}

/* --- output buffer ------------------------------------------------------------------------
 *
 * Lines are written into a scratch buffer kept between calls and copied once into the result.
 * A fresh buffer per batch (a few hundred KB, so mmap'ed by malloc) made the kernel fault in
 * and zero every page of it on each call: about a third of the C writer's time. The buffer is
 * taken for the duration of a call; a call that finds it taken (another thread came in while
 * Python code ran for this one) writes into a private buffer instead. */

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} buf_t;

static char *scratch;
static Py_ssize_t scratch_cap;
static int scratch_busy;
/* A scratch buffer grown past this by a huge batch is freed rather than kept. */
#define SCRATCH_KEEP (8 << 20)
#define BUF_MIN 65536

static int grow(buf_t *b, Py_ssize_t need)
{
    if (need > PY_SSIZE_T_MAX / 2 - b->len) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t cap = b->cap * 2;
    if (cap < b->len + need)
        cap = b->len + need;
    if (cap < BUF_MIN)
        cap = BUF_MIN;
    char *data = PyMem_Realloc(b->data, (size_t)cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
    return 0;
}

/* Make room for ``need`` more bytes; returns where to write them (NULL on MemoryError). */
static inline char *reserve(buf_t *b, Py_ssize_t need)
{
    if (b->len + need > b->cap && grow(b, need) < 0)
        return NULL;
    return b->data + b->len;
}

static void buf_open(buf_t *b, int *own_scratch)
{
    b->len = 0;
    *own_scratch = !scratch_busy;
    if (*own_scratch) {
        scratch_busy = 1;
        b->data = scratch;
        b->cap = scratch_cap;
    } else {
        b->data = NULL;
        b->cap = 0;
    }
}

static void buf_close(buf_t *b, int own_scratch)
{
    if (own_scratch && b->cap <= SCRATCH_KEEP) {
        scratch = b->data;
        scratch_cap = b->cap;
    } else {
        if (own_scratch) {
            scratch = NULL;
            scratch_cap = 0;
        }
        PyMem_Free(b->data);
    }
    if (own_scratch)
        scratch_busy = 0;
}

static inline int put(buf_t *b, const char *s, Py_ssize_t n)
{
    char *w = reserve(b, n);
    if (w == NULL)
        return -1;
    memcpy(w, s, (size_t)n);
    b->len += n;
    return 0;
}

#define PUT_LIT(b, lit) put((b), (lit), (Py_ssize_t)(sizeof(lit) - 1))

static int put_bytes(buf_t *b, PyObject *bytes)
{
    return put(b, PyBytes_AS_STRING(bytes), PyBytes_GET_SIZE(bytes));
}

/* "00".."99": two digits per division. */
static const char digit_pairs[201] =
    "00010203040506070809101112131415161718192021222324252627282930313233343536373839"
    "40414243444546474849505152535455565758596061626364656667686970717273747576777879"
    "8081828384858687888990919293949596979899";

static char *write_u64(char *w, unsigned long long v)
{
    char tmp[20];
    char *t = tmp + sizeof tmp;
    while (v >= 100) {
        unsigned d = (unsigned)(v % 100) * 2;
        v /= 100;
        t -= 2;
        memcpy(t, digit_pairs + d, 2);
    }
    if (v >= 10) {
        t -= 2;
        memcpy(t, digit_pairs + v * 2, 2);
    } else
        *--t = (char)('0' + v);
    size_t n = (size_t)(tmp + sizeof tmp - t);
    memcpy(w, t, n);
    return w + n;
}

static int put_ll(buf_t *b, long long v)
{
    char *w = reserve(b, 21);
    if (w == NULL)
        return -1;
    char *start = w;
    unsigned long long mag = (unsigned long long)v;
    if (v < 0) {
        *w++ = '-';
        mag = 0 - mag; /* well defined for LLONG_MIN too */
    }
    w = write_u64(w, mag);
    b->len += w - start;
    return 0;
}

static int put_hex(buf_t *b, PyObject *bytes)
{
    Py_ssize_t n = PyBytes_GET_SIZE(bytes);
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(bytes);
    char *w = reserve(b, 2 * n);
    if (w == NULL)
        return -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        *w++ = hexdigits[s[i] >> 4];
        *w++ = hexdigits[s[i] & 15];
    }
    b->len += 2 * n;
    return 0;
}

static inline char *write_escape(char *w, unsigned char c)
{
    char e = escape[c];
    *w++ = '\\';
    if (e == 'u') {
        memcpy(w, "u00", 3);
        w[3] = hexdigits[c >> 4];
        w[4] = hexdigits[c & 15];
        return w + 5;
    }
    *w++ = e;
    return w;
}

/* A str as a JSON string, quoted; FALLBACK when it holds a surrogate (not UTF-8 encodable). */
static int put_str(buf_t *b, PyObject *s)
{
    if (PyUnicode_READY(s) < 0)
        return -1;
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    /* No character takes more than 6 bytes ("\u001f"); the quotes take 2. */
    if (n > (PY_SSIZE_T_MAX - 2) / 6) {
        PyErr_NoMemory();
        return -1;
    }
    char *w = reserve(b, 6 * n + 2);
    if (w == NULL)
        return -1;
    char *start = w;
    *w++ = '"';
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    if (PyUnicode_IS_ASCII(s)) {
        const unsigned char *p = data;
        Py_ssize_t i = 0;
        while (i < n) {
            /* Eight bytes at a time while none needs an escape (bytes are ASCII, < 0x80, so
             * "x - 0x20 borrows into bit 7" means x < 0x20); the run is copied as it goes.
             * Writing 8 bytes is in bounds: 6n + 2 bytes are reserved. */
            while (i + 8 <= n) {
                uint64_t x;
                memcpy(&x, p + i, 8);
                uint64_t q = x ^ 0x2222222222222222ULL, bs = x ^ 0x5c5c5c5c5c5c5c5cULL;
                uint64_t hit = ((x - 0x2020202020202020ULL) | (q - 0x0101010101010101ULL) |
                                (bs - 0x0101010101010101ULL)) & 0x8080808080808080ULL;
                if (hit)
                    break;
                memcpy(w, &x, 8);
                w += 8;
                i += 8;
            }
            Py_ssize_t j = i;
            while (j < n && !escape[p[j]])
                j++;
            memcpy(w, p + i, (size_t)(j - i));
            w += j - i;
            if (j == n)
                break;
            w = write_escape(w, p[j]);
            i = j + 1;
        }
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_UCS4 c = PyUnicode_READ(kind, data, i);
            if (c < 0x80) {
                if (escape[c])
                    w = write_escape(w, (unsigned char)c);
                else
                    *w++ = (char)c;
            } else if (c < 0x800) {
                *w++ = (char)(0xC0 | (c >> 6));
                *w++ = (char)(0x80 | (c & 0x3F));
            } else if (c < 0x10000) {
                if (c >= 0xD800 && c <= 0xDFFF)
                    return FALLBACK;
                *w++ = (char)(0xE0 | (c >> 12));
                *w++ = (char)(0x80 | ((c >> 6) & 0x3F));
                *w++ = (char)(0x80 | (c & 0x3F));
            } else {
                *w++ = (char)(0xF0 | (c >> 18));
                *w++ = (char)(0x80 | ((c >> 12) & 0x3F));
                *w++ = (char)(0x80 | ((c >> 6) & 0x3F));
                *w++ = (char)(0x80 | (c & 0x3F));
            }
        }
    }
    *w++ = '"';
    b->len += w - start;
    return 0;
}

/* After Python code called here failed: an Exception means the batch goes to the Python
 * writer, which meets the same input in its own order and raises what it raises; anything
 * else (KeyboardInterrupt, SystemExit) propagates now. */
static int failed(void)
{
    if (PyErr_ExceptionMatches(PyExc_Exception)) {
        PyErr_Clear();
        return FALLBACK;
    }
    return -1;
}

/* The value of an int-like field (kind, status code, a time) when it is an exact int, a bool
 * or of the enum type ``cls`` (whose int() is its value) and fits a long long. */
static int small_int(PyObject *v, PyTypeObject *cls, long long *out)
{
    PyTypeObject *t = Py_TYPE(v);
    if (t != &PyLong_Type && t != &PyBool_Type && (cls == NULL || t != cls))
        return FALLBACK;
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow)
        return FALLBACK;
    if (x == -1 && PyErr_Occurred())
        return failed();
    *out = x;
    return 0;
}

/* str(v) as a JSON string (an int beyond int64 as its stringValue). */
static int put_str_of(buf_t *b, PyObject *v)
{
    PyObject *s = PyObject_Str(v);
    if (s == NULL)
        return failed();
    int rc = PyUnicode_CheckExact(s) ? put_str(b, s) : FALLBACK;
    Py_DECREF(s);
    return rc;
}

/* One attribute as its KeyValue object. */
static int put_kv(buf_t *b, PyObject *key, PyObject *value)
{
    PyTypeObject *t = Py_TYPE(value);
    int rc;
    if (!PyUnicode_CheckExact(key) ||
        (t != &PyUnicode_Type && t != &PyLong_Type && t != &PyBool_Type && t != &PyFloat_Type)) {
        PyObject *args[2] = {key, value};
        Py_INCREF(key);
        Py_INCREF(value);
        PyObject *kv = PyObject_Vectorcall(kv_py, args, 2, NULL);
        Py_DECREF(key);
        Py_DECREF(value);
        if (kv == NULL)
            return failed();
        rc = PyBytes_CheckExact(kv) ? put_bytes(b, kv) : FALLBACK;
        Py_DECREF(kv);
        n_delegated += rc == 0;
        return rc;
    }
    if (PUT_LIT(b, "{\"key\":") < 0)
        return -1;
    if ((rc = put_str(b, key)) < 0)
        return rc;
    if (t == &PyUnicode_Type) {
        if (PUT_LIT(b, ",\"value\":{\"stringValue\":") < 0)
            return -1;
        if ((rc = put_str(b, value)) < 0)
            return rc;
    } else if (t == &PyBool_Type) {
        rc = value == Py_True ? PUT_LIT(b, ",\"value\":{\"boolValue\":true")
                              : PUT_LIT(b, ",\"value\":{\"boolValue\":false");
        if (rc < 0)
            return -1;
    } else if (t == &PyLong_Type) {
        int overflow = 0;
        long long x = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (overflow) {
            /* Beyond int64: the proto mapping has no such integer, so its decimal string. */
            if (PUT_LIT(b, ",\"value\":{\"stringValue\":") < 0)
                return -1;
            if ((rc = put_str_of(b, value)) < 0)
                return rc;
        } else {
            if (x == -1 && PyErr_Occurred())
                return failed();
            if (PUT_LIT(b, ",\"value\":{\"intValue\":\"") < 0 || put_ll(b, x) < 0 ||
                PUT_LIT(b, "\"") < 0)
                return -1;
        }
    } else {
        double d = PyFloat_AS_DOUBLE(value);
        if (PUT_LIT(b, ",\"value\":{\"doubleValue\":") < 0)
            return -1;
        if (isnan(d))
            rc = PUT_LIT(b, "\"NaN\"");
        else if (isinf(d))
            rc = d > 0 ? PUT_LIT(b, "\"Infinity\"") : PUT_LIT(b, "\"-Infinity\"");
        else {
            PyObject *num = PyObject_Vectorcall(dumps_py, &value, 1, NULL);
            if (num == NULL)
                return failed();
            rc = PyBytes_CheckExact(num) ? put_bytes(b, num) : FALLBACK;
            Py_DECREF(num);
        }
        if (rc < 0)
            return rc;
    }
    return PUT_LIT(b, "}}");
}

/* The KeyValues of an exact dict, comma separated. */
static int put_attributes(buf_t *b, PyObject *attrs)
{
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    int first = 1, rc = 0;
    /* Held: Python code run for one attribute could replace the dict it came from. */
    Py_INCREF(attrs);
    while (PyDict_Next(attrs, &pos, &key, &value)) {
        if (!first && PUT_LIT(b, ",") < 0) {
            rc = -1;
            break;
        }
        first = 0;
        if ((rc = put_kv(b, key, value)) < 0)
            break;
    }
    Py_DECREF(attrs);
    return rc;
}

/* A time: exact int (or bool, as "%d" takes it) as a quoted decimal; nothing when 0. */
static int put_time(buf_t *b, const char *prefix, Py_ssize_t plen, PyObject *v)
{
    PyTypeObject *t = Py_TYPE(v);
    if (t != &PyLong_Type && t != &PyBool_Type)
        return FALLBACK;
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (!overflow && x == -1 && PyErr_Occurred())
        return failed();
    if (!overflow && x == 0)
        return 0;
    if (put(b, prefix, plen) < 0)
        return -1;
    if (overflow) {
        /* str() of an exact int is what "%d" writes; both refuse past 4300 digits. */
        PyObject *s = PyObject_Str(v);
        if (s == NULL)
            return failed();
        Py_ssize_t n;
        const char *u = PyUnicode_AsUTF8AndSize(s, &n);
        int rc = u == NULL ? failed() : put(b, u, n);
        Py_DECREF(s);
        if (rc < 0)
            return rc;
    } else if (put_ll(b, x) < 0)
        return -1;
    return PUT_LIT(b, "\"");
}

#define START_PREFIX ",\"startTimeUnixNano\":\""
#define END_PREFIX ",\"endTimeUnixNano\":\""

static int put_span(buf_t *b, PyObject *span)
{
    PyObject *v;
    int rc;
    long long x;
    /* A slot can be empty (never set, or deleted): the Python raises AttributeError. */
#define FIELD(f)                          \
    if ((v = slot(span, span_off[f])) == NULL) \
        return FALLBACK;

    FIELD(F_TRACE_ID);
    if (!PyBytes_CheckExact(v))
        return FALLBACK;
    if (PUT_LIT(b, "{\"traceId\":\"") < 0 || put_hex(b, v) < 0)
        return -1;
    FIELD(F_SPAN_ID);
    if (!PyBytes_CheckExact(v))
        return FALLBACK;
    if (PUT_LIT(b, "\",\"spanId\":\"") < 0 || put_hex(b, v) < 0 || PUT_LIT(b, "\"") < 0)
        return -1;
    FIELD(F_PARENT);
    if (v != Py_None) {
        if (!PyBytes_CheckExact(v))
            return FALLBACK;
        if (PyBytes_GET_SIZE(v) &&
            (PUT_LIT(b, ",\"parentSpanId\":\"") < 0 || put_hex(b, v) < 0 || PUT_LIT(b, "\"") < 0))
            return -1;
    }
    FIELD(F_NAME);
    if (!PyUnicode_CheckExact(v))
        return FALLBACK;
    Py_ssize_t len = PyUnicode_GetLength(v);
    if (len < 0)
        return -1;
    if (len) {
        if (PUT_LIT(b, ",\"name\":") < 0)
            return -1;
        if ((rc = put_str(b, v)) < 0)
            return rc;
    }
    FIELD(F_KIND);
    if ((rc = small_int(v, kind_cls, &x)) < 0)
        return rc;
    if (x && (PUT_LIT(b, ",\"kind\":") < 0 || put_ll(b, x) < 0))
        return -1;
    FIELD(F_START);
    if ((rc = put_time(b, START_PREFIX, (Py_ssize_t)sizeof(START_PREFIX) - 1, v)) < 0)
        return rc;
    FIELD(F_END);
    if ((rc = put_time(b, END_PREFIX, (Py_ssize_t)sizeof(END_PREFIX) - 1, v)) < 0)
        return rc;
    FIELD(F_ATTRS);
    if (!PyDict_CheckExact(v))
        return FALLBACK;
    if (PyDict_GET_SIZE(v)) {
        if (PUT_LIT(b, ",\"attributes\":[") < 0)
            return -1;
        if ((rc = put_attributes(b, v)) < 0)
            return rc;
        if (PUT_LIT(b, "]") < 0)
            return -1;
    }
    /* Read after the attributes: Python code run for them may have changed these. */
    FIELD(F_MESSAGE);
    PyObject *message = v;
    if (!PyUnicode_CheckExact(message))
        return FALLBACK;
    FIELD(F_STATUS);
    /* The Python tests ``status is StatusCode.UNSET``: an int 0 is written as code 0. */
    int unset = v == status_unset;
    if ((len = PyUnicode_GetLength(message)) < 0)
        return -1;
    int has_message = len > 0;
    if (!unset || has_message) {
        x = 0;
        if (!unset && (rc = small_int(v, status_cls, &x)) < 0)
            return rc;
        if (PUT_LIT(b, ",\"status\":{") < 0)
            return -1;
        if (has_message) {
            if (PUT_LIT(b, "\"message\":") < 0)
                return -1;
            if ((rc = put_str(b, message)) < 0)
                return rc;
        }
        if (!unset && ((has_message && PUT_LIT(b, ",") < 0) || PUT_LIT(b, "\"code\":") < 0 ||
                       put_ll(b, x) < 0))
            return -1;
        if (PUT_LIT(b, "}") < 0)
            return -1;
    }
#undef FIELD
    return PUT_LIT(b, "}");
}

/* Per-resource groups, in order of first appearance; spans chained through next[]. */
typedef struct {
    Py_ssize_t first, last;
    PyObject *attrs; /* the first span's resource attributes (held), NULL when empty */
} group_t;

static PyObject *fallback(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    n_fallback++;
    return PyObject_Vectorcall(line_py, args, (size_t)nargs, kwnames);
}


/* Assign each span to its resource group as the Python's dict keyed by ``resource.key`` does.
 * A span whose key is the same object as the previous span's joins that group without a
 * lookup: a dict finds an identical key before comparing. */
static int group_spans(PyObject *spans, Py_ssize_t *next, group_t *groups, Py_ssize_t *n_groups)
{
    Py_ssize_t n = PyTuple_GET_SIZE(spans);
    PyObject *by_key = PyDict_New();
    if (by_key == NULL)
        return -1;
    PyObject *last_key = NULL; /* held, so its address cannot be reused by another key */
    Py_ssize_t g = -1;
    int rc = FALLBACK;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *span = PyTuple_GET_ITEM(spans, i);
        if (Py_TYPE(span) != span_cls)
            goto done;
        PyObject *res = slot(span, span_off[F_RESOURCE]);
        if (res == NULL || Py_TYPE(res) != resource_cls)
            goto done;
        PyObject *key = slot(res, resource_off[R_KEY]);
        if (key == NULL)
            goto done;
        next[i] = -1;
        if (key == last_key) {
            next[groups[g].last] = i;
            groups[g].last = i;
            continue;
        }
        /* Hashing and comparing keys can run Python code: hold what is used across it. */
        Py_INCREF(res);
        Py_XSETREF(last_key, Py_NewRef(key));
        PyObject *found = PyDict_GetItemWithError(by_key, key);
        if (found != NULL) {
            g = PyLong_AsSsize_t(found);
            next[groups[g].last] = i;
            groups[g].last = i;
            Py_DECREF(res);
            continue;
        }
        if (PyErr_Occurred()) {
            Py_DECREF(res);
            rc = failed();
            goto done;
        }
        PyObject *attrs = slot(res, resource_off[R_ATTRS]);
        if (attrs == NULL || !PyDict_CheckExact(attrs)) {
            Py_DECREF(res);
            goto done;
        }
        g = (*n_groups)++;
        groups[g].first = groups[g].last = i;
        groups[g].attrs = PyDict_GET_SIZE(attrs) ? Py_NewRef(attrs) : NULL;
        Py_DECREF(res);
        PyObject *index = PyLong_FromSsize_t(g);
        if (index == NULL) {
            rc = -1;
            goto done;
        }
        int set = PyDict_SetItem(by_key, key, index);
        Py_DECREF(index);
        if (set < 0) {
            rc = failed();
            goto done;
        }
    }
    rc = 0;
done:
    Py_XDECREF(last_key);
    Py_DECREF(by_key);
    return rc;
}

static int write_batch(buf_t *b, PyObject *spans, PyObject *scope, PyObject *schema)
{
    Py_ssize_t n = PyTuple_GET_SIZE(spans);
    Py_ssize_t n_groups = 0;
    int rc = -1;
    Py_ssize_t *next = PyMem_Malloc((size_t)n * sizeof(Py_ssize_t));
    group_t *groups = PyMem_Malloc((size_t)n * sizeof(group_t));
    if (next == NULL || groups == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if ((rc = group_spans(spans, next, groups, &n_groups)) < 0)
        goto done;
    rc = -1;
    if (PUT_LIT(b, "{\"resourceSpans\":[") < 0)
        goto done;
    for (Py_ssize_t g = 0; g < n_groups; g++) {
        if ((g && PUT_LIT(b, ",") < 0) || PUT_LIT(b, "{") < 0)
            goto done;
        if (groups[g].attrs != NULL) {
            if (PUT_LIT(b, "\"resource\":{\"attributes\":[") < 0)
                goto done;
            if ((rc = put_attributes(b, groups[g].attrs)) < 0)
                goto done;
            rc = -1;
            if (PUT_LIT(b, "]},") < 0)
                goto done;
        }
        if (PUT_LIT(b, "\"scopeSpans\":[{\"scope\":") < 0 || put_bytes(b, scope) < 0 ||
            PUT_LIT(b, ",\"spans\":[") < 0)
            goto done;
        for (Py_ssize_t i = groups[g].first; i >= 0; i = next[i]) {
            if (i != groups[g].first && PUT_LIT(b, ",") < 0)
                goto done;
            if ((rc = put_span(b, PyTuple_GET_ITEM(spans, i))) < 0)
                goto done;
            rc = -1;
        }
        if (PUT_LIT(b, "],\"schemaUrl\":") < 0 || put_bytes(b, schema) < 0 ||
            PUT_LIT(b, "}],\"schemaUrl\":") < 0 || put_bytes(b, schema) < 0 ||
            PUT_LIT(b, "}") < 0)
            goto done;
    }
    if (PUT_LIT(b, "]}\n") < 0)
        goto done;
    rc = 0;
done:
    for (Py_ssize_t k = 0; k < n_groups; k++)
        Py_XDECREF(groups[k].attrs);
    PyMem_Free(groups);
    PyMem_Free(next);
    return rc;
}

static PyObject *otlp_json_line(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames)
{
    (void)self;
    if (line_py == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_fastjson.configure() was not called");
        return NULL;
    }
    if (kwnames != NULL || nargs != 1)
        return fallback(args, nargs, kwnames);
    PyObject *spans;
    if (PyTuple_CheckExact(args[0]))
        spans = Py_NewRef(args[0]);
    else if (PyList_CheckExact(args[0])) {
        /* A snapshot: Python code run on the way could change the list. */
        spans = PyList_AsTuple(args[0]);
        if (spans == NULL)
            return NULL;
    } else
        return fallback(args, nargs, kwnames);
    Py_ssize_t n = PyTuple_GET_SIZE(spans);
    if (n == 0) {
        Py_DECREF(spans);
        n_fast++;
        return PyBytes_FromStringAndSize("{}\n", 3);
    }
    int rc = -1, own_scratch;
    buf_t b;
    PyObject *line = NULL;
    buf_open(&b, &own_scratch);
    PyObject *env = PyObject_CallNoArgs(envelope_py);
    if (env == NULL) {
        rc = failed();
        goto done;
    }
    if (!PyTuple_CheckExact(env) || PyTuple_GET_SIZE(env) != 2 ||
        !PyBytes_CheckExact(PyTuple_GET_ITEM(env, 0)) ||
        !PyBytes_CheckExact(PyTuple_GET_ITEM(env, 1))) {
        rc = FALLBACK;
        goto done;
    }
    rc = write_batch(&b, spans, PyTuple_GET_ITEM(env, 0), PyTuple_GET_ITEM(env, 1));
    if (rc == 0 && (line = PyBytes_FromStringAndSize(b.data, b.len)) == NULL)
        rc = -1;
done:
    buf_close(&b, own_scratch);
    Py_XDECREF(env);
    Py_DECREF(spans);
    if (rc == 0) {
        n_fast++;
        return line;
    }
    if (rc == FALLBACK)
        return fallback(args, nargs, kwnames);
    return NULL;
}

/* The byte offset of the object slot ``name`` of ``cls`` (a __slots__ member). */
static int member_offset(PyTypeObject *cls, const char *name, Py_ssize_t *off)
{
    PyObject *d = PyObject_GetAttrString((PyObject *)cls, name);
    if (d == NULL)
        return -1;
    int ok = Py_IS_TYPE(d, &PyMemberDescr_Type) && PyDescr_TYPE(d) == cls &&
             ((PyMemberDescrObject *)d)->d_member->type == T_OBJECT_EX;
    if (ok)
        *off = ((PyMemberDescrObject *)d)->d_member->offset;
    Py_DECREF(d);
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not an object slot", cls->tp_name, name);
        return -1;
    }
    return 0;
}

static PyObject *configure(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *sc, *rc_, *kc, *stc, *unset, *line, *kv, *env, *dumps;
    if (!PyArg_ParseTuple(args, "O!O!O!O!OOOOO:configure", &PyType_Type, &sc, &PyType_Type,
                          &rc_, &PyType_Type, &kc, &PyType_Type, &stc, &unset, &line, &kv,
                          &env, &dumps))
        return NULL;
    if (!PyCallable_Check(line) || !PyCallable_Check(kv) || !PyCallable_Check(env) ||
        !PyCallable_Check(dumps)) {
        PyErr_SetString(PyExc_TypeError, "configure(): the last four arguments are callables");
        return NULL;
    }
    Py_ssize_t so[F_N], ro[R_N];
    for (int i = 0; i < F_N; i++)
        if (member_offset((PyTypeObject *)sc, span_fields[i], &so[i]) < 0)
            return NULL;
    for (int i = 0; i < R_N; i++)
        if (member_offset((PyTypeObject *)rc_, resource_fields[i], &ro[i]) < 0)
            return NULL;
    memcpy(span_off, so, sizeof so);
    memcpy(resource_off, ro, sizeof ro);
    Py_XSETREF(span_cls, (PyTypeObject *)Py_NewRef(sc));
    Py_XSETREF(resource_cls, (PyTypeObject *)Py_NewRef(rc_));
    Py_XSETREF(kind_cls, (PyTypeObject *)Py_NewRef(kc));
    Py_XSETREF(status_cls, (PyTypeObject *)Py_NewRef(stc));
    Py_XSETREF(status_unset, Py_NewRef(unset));
    Py_XSETREF(kv_py, Py_NewRef(kv));
    Py_XSETREF(envelope_py, Py_NewRef(env));
    Py_XSETREF(dumps_py, Py_NewRef(dumps));
    Py_XSETREF(line_py, Py_NewRef(line)); /* last: it marks the module configured */
    Py_RETURN_NONE;
}

static PyObject *counts(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return Py_BuildValue("(KKK)", n_fast, n_fallback, n_delegated);
}

static PyMethodDef methods_def[] = {
    {"counts", counts, METH_NOARGS,
     "counts() -> (batches written in C, batches handed to otlp_json_line_py, attributes\n"
     "written by otlp_json._kv_bytes for the C writer) since import."},
    {"configure", configure, METH_VARARGS,
     "configure(SpanRecord, Resource, SpanKind, StatusCode, StatusCode.UNSET,\n"
     "otlp_json_line_py, kv_bytes, envelope, orjson.dumps): the record types to read, the\n"
     "Python writer that takes every batch this module does not, the writer of one odd\n"
     "attribute, the (scope, schemaUrl) bytes of a batch, and the float formatter."},
    {"otlp_json_line", (PyCFunction)(void (*)(void))otlp_json_line,
     METH_FASTCALL | METH_KEYWORDS,
     "otlp_json_line(spans) -> bytes: orjson.dumps(to_otlp_json(spans)) + b'\\n', byte for\n"
     "byte, as otlp_json.otlp_json_line_py."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastjson",
    "Optional C writer for OTLP/JSON lines; see kernel_side.export.otlp_json.", -1,
    methods_def, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastjson(void)
{
    for (int c = 0; c < 0x20; c++)
        escape[c] = 'u';
    escape['\b'] = 'b';
    escape['\t'] = 't';
    escape['\n'] = 'n';
    escape['\f'] = 'f';
    escape['\r'] = 'r';
    escape['"'] = '"';
    escape['\\'] = '\\';
    return PyModule_Create(&module);
}
