/* Optional accelerator for the OTLP protobuf wire encoder (kernel_side.export.otlp_wire).
 *
 * encode(spans, scope, schema) writes the same ExportTraceServiceRequest bytes as
 * otlp_wire.encode_export_request_py, byte for byte; the Python function is the reference and
 * tests/unit/test_otlp_wire_fast.py compares the two on random batches. The Python encoder
 * spends about 7.5 us per span, mostly on building and joining small bytes objects (one or more
 * per attribute, tag and length); here each span is written straight into one growing buffer.
 *
 * What stays in Python, so that it exists once:
 *   - the per-resource header (the encoded Resource field), through the cached heads callback;
 *   - the scope and schema_url fields, passed in as bytes by the wrapper;
 *   - every attribute value that is not an exact str, int, float or bool, through the
 *     any_value callback (otlp_wire._any_value): str subclasses, IntEnum, out-of-range ints
 *     use str(), and only Python knows every way that can go.
 *
 * encode() returns None for input it does not take, with no output and the input untouched
 * (callbacks already made, such as the header cache's, may have run): spans not an exact list
 * or tuple, a span that is not exactly SpanRecord, ids that are not bytes, field values whose
 * truth or int() would need Python (anything but None, exact int/bool/str/dict, the configured
 * enum types), a kind or status code outside 0..255 (bytes((tag, n)) raises there). The
 * wrapper then runs the Python encoder, which either produces the bytes or raises the error it
 * always raised. Exceptions raised by the callbacks propagate; the wrapper treats them the same
 * way.
 *
 * Nested messages are length-prefixed, so their sizes must be known before their bytes. Each
 * span is written after a 2-byte hole for its length (the agent's spans are a few hundred bytes,
 * which a 2-byte varint holds) and moved when its length takes another size; KeyValue and
 * AnyValue sizes are computed before writing; the ResourceSpans and ScopeSpans sizes come from
 * the per-group buffers at the end, when the result is written once into a bytes object of its
 * exact size.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <stdint.h>
#include <string.h>

#ifndef Py_T_OBJECT_EX
#define Py_T_OBJECT_EX T_OBJECT_EX
#endif

/* --- configuration, from otlp_wire at import -------------------------------------------- */

/* SpanRecord's fields, read straight from the instance's slots: the type is a slots dataclass
 * and these are its member descriptors' offsets, so a field costs a load instead of an
 * attribute lookup (eleven per span). Only an instance of exactly this type is read this way;
 * NULL is an unset slot, where Python raises AttributeError. */
enum {
    F_TRACE_ID, F_SPAN_ID, F_PARENT_ID, F_NAME, F_KIND, F_START, F_END, F_RESOURCE,
    F_ATTRIBUTES, F_STATUS, F_STATUS_MESSAGE, N_FIELDS
};
static const char *const field_names[N_FIELDS] = {
    "trace_id", "span_id", "parent_span_id", "name", "kind", "start_ns", "end_ns", "resource",
    "attributes", "status", "status_message",
};
static Py_ssize_t field_off[N_FIELDS];

static PyTypeObject *span_type;   /* SpanRecord */
static PyTypeObject *kind_type;   /* SpanKind: int(kind) is its value */
static PyTypeObject *status_type; /* StatusCode */
static PyObject *status_unset;    /* StatusCode.UNSET, compared by identity as Python does */
static PyObject *any_value_fn;    /* otlp_wire._any_value */
static PyObject *heads_fn;        /* otlp_wire._HEADERS.resource */
static PyObject *str_key;         /* "key" */

#define FIELD(obj, f) (*(PyObject **)((char *)(obj) + field_off[f]))

/* Result codes of the writers below. */
#define ENC_OK 0
#define ENC_ERROR -1    /* a Python exception is set */
#define ENC_FALLBACK 1  /* input this module does not take; no exception set */

/* --- output buffer and varints ---------------------------------------------------------- */

typedef struct {
    char *p;
    Py_ssize_t len, cap;
} Buf;

static int buf_grow(Buf *b, Py_ssize_t need)
{
    Py_ssize_t cap = b->cap ? b->cap : 4096;
    char *p;
    if (need > PY_SSIZE_T_MAX / 2 - b->len) {
        PyErr_NoMemory();
        return -1;
    }
    while (cap - b->len < need)
        cap *= 2;
    p = PyMem_Realloc(b->p, (size_t)cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

/* Room for need more bytes at b->p + b->len. */
static inline int buf_reserve(Buf *b, Py_ssize_t need)
{
    return (b->cap - b->len >= need) ? 0 : buf_grow(b, need);
}

static inline int varint_len(uint64_t v)
{
    int n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

static inline char *put_varint(char *p, uint64_t v)
{
    while (v >= 0x80) {
        *p++ = (char)((v & 0x7F) | 0x80);
        v >>= 7;
    }
    *p++ = (char)v;
    return p;
}

/* tag, varint(n), n bytes: the caller reserved 1 + varint_len(n) + n. */
static inline char *put_ld(char *p, unsigned char tag, const char *s, Py_ssize_t n)
{
    *p++ = (char)tag;
    p = put_varint(p, (uint64_t)n);
    memcpy(p, s, (size_t)n);
    return p + n;
}

static inline Py_ssize_t ld_size(Py_ssize_t n)
{
    return 1 + varint_len((uint64_t)n) + n;
}

/* --- strings ---------------------------------------------------------------------------- */

/* str.encode("utf-8", "replace") of an exact str, without a bytes object in the usual case:
 * the str's own UTF-8 (cached in it by CPython). Strings with lone surrogates have no UTF-8
 * form; for those the codec itself makes the replacement bytes, so the result cannot differ
 * from Python's. *owner holds those bytes (or NULL) and must be released by the caller. */
static inline int utf8_of(PyObject *s, const char **data, Py_ssize_t *size, PyObject **owner)
{
    *owner = NULL;
    if (PyUnicode_IS_COMPACT_ASCII(s)) { /* nearly every key and value: no call needed */
        *data = (const char *)PyUnicode_DATA(s);
        *size = PyUnicode_GET_LENGTH(s);
        return 0;
    }
    *data = PyUnicode_AsUTF8AndSize(s, size);
    if (*data != NULL)
        return 0;
    if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
        return -1;
    PyErr_Clear();
    *owner = PyUnicode_AsEncodedString(s, "utf-8", "replace");
    if (*owner == NULL)
        return -1;
    *data = PyBytes_AS_STRING(*owner);
    *size = PyBytes_GET_SIZE(*owner);
    return 0;
}

/* --- one attribute ---------------------------------------------------------------------- */

/* The attribute field `tag` (KeyValue inside) for key (an exact str) and value, as
 * _Attributes.encode writes it: _ld(tag, _ld(0x0A, key) + _ld(0x12, _any_value(value))). */
static int put_attribute(Buf *b, unsigned char tag, PyObject *key, PyObject *value,
                         PyObject *dict)
{
    /* How the AnyValue is held until it is written: the bytes after its tag (scalar), a
     * string_value's UTF-8, or a whole AnyValue that Python wrote. */
    enum { AV_SCALAR, AV_STRING, AV_WHOLE } mode = AV_SCALAR;
    const char *kd, *vd = NULL;
    Py_ssize_t kn, vn = 0, av_len, kv_len;
    PyObject *kown = NULL, *vown = NULL;
    char scalar[11]; /* a non-string AnyValue: tag + up to 10 bytes (a negative int64) */
    int rc = ENC_ERROR;
    char *p;
    PyTypeObject *t = Py_TYPE(value);

    if (utf8_of(key, &kd, &kn, &kown) < 0)
        return ENC_ERROR;
    if (t == &PyUnicode_Type) {
        if (utf8_of(value, &vd, &vn, &vown) < 0)
            goto done;
        mode = AV_STRING;
    } else if (t == &PyBool_Type) {
        scalar[0] = 0x10; /* bool_value = 2 */
        scalar[1] = (char)(value == Py_True);
        vn = 2;
    } else if (t == &PyLong_Type) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (v == -1 && PyErr_Occurred())
            goto done;
        if (overflow) {
            /* Beyond int64: its decimal string (ASCII, so no replacement can occur). */
            PyObject *s = PyObject_Str(value);
            if (s == NULL)
                goto done;
            vown = PyUnicode_AsEncodedString(s, "utf-8", "replace");
            Py_DECREF(s);
            if (vown == NULL)
                goto done;
            vd = PyBytes_AS_STRING(vown);
            vn = PyBytes_GET_SIZE(vown);
            mode = AV_STRING;
        } else {
            scalar[0] = 0x18; /* int_value = 3: varint of the two's complement */
            vn = put_varint(scalar + 1, (uint64_t)v) - scalar;
        }
    } else if (t == &PyFloat_Type) {
        scalar[0] = 0x21; /* double_value = 4, fixed64 */
        /* struct.pack("<d") is this call: NaN payloads and -0.0 come out the same. */
        if (PyFloat_Pack8(PyFloat_AS_DOUBLE(value), scalar + 1, 1) < 0)
            goto done;
        vn = 9;
    } else {
        /* Everything else is rare and has Python semantics (str(), subclasses, __index__):
         * the Python function writes the AnyValue. It may run arbitrary code, so the borrowed
         * key and value are kept alive, and the batch is given up if the dict was resized
         * (the Python loop raises there). */
        Py_ssize_t before = PyDict_GET_SIZE(dict);
        Py_INCREF(key);
        Py_INCREF(value);
        vown = PyObject_CallOneArg(any_value_fn, value);
        Py_DECREF(value);
        Py_DECREF(key);
        if (vown == NULL)
            goto done;
        if (!PyBytes_CheckExact(vown) || PyDict_GET_SIZE(dict) != before) {
            rc = ENC_FALLBACK;
            goto done;
        }
        vd = PyBytes_AS_STRING(vown);
        vn = PyBytes_GET_SIZE(vown);
        mode = AV_WHOLE;
    }
    av_len = mode == AV_STRING ? ld_size(vn) : vn; /* string_value = 1 */
    kv_len = ld_size(kn) + ld_size(av_len);
    if (buf_reserve(b, ld_size(kv_len)) < 0)
        goto done;
    p = b->p + b->len;
    *p++ = (char)tag;
    p = put_varint(p, (uint64_t)kv_len);
    p = put_ld(p, 0x0A, kd, kn); /* KeyValue.key = 1 */
    *p++ = 0x12;                 /* KeyValue.value = 2 */
    p = put_varint(p, (uint64_t)av_len);
    if (mode == AV_STRING) {
        p = put_ld(p, 0x0A, vd, vn);
    } else {
        memcpy(p, mode == AV_SCALAR ? scalar : vd, (size_t)vn);
        p += vn;
    }
    b->len = p - b->p;
    rc = ENC_OK;
done:
    Py_XDECREF(kown);
    Py_XDECREF(vown);
    return rc;
}

/* Every attribute of dict in its order, as field `tag`. */
static int put_attributes(Buf *b, unsigned char tag, PyObject *dict)
{
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    int rc = ENC_OK;

    Py_INCREF(dict); /* a callback could drop the span's reference */
    while (PyDict_Next(dict, &pos, &key, &value)) {
        if (!PyUnicode_CheckExact(key)) {
            rc = ENC_FALLBACK; /* key.encode and the caches' hashing are Python's business */
            break;
        }
        rc = put_attribute(b, tag, key, value, dict);
        if (rc != ENC_OK)
            break;
    }
    Py_DECREF(dict);
    return rc;
}

/* --- one span --------------------------------------------------------------------------- */

/* int(obj) for a kind or status code that bytes((tag, n)) accepts, or -1 for "not ours". */
static int small_code(PyObject *obj, PyTypeObject *enum_type)
{
    PyTypeObject *t = Py_TYPE(obj);
    long v;
    if (t != &PyLong_Type && t != &PyBool_Type && t != enum_type)
        return -1;
    v = PyLong_AsLong(obj);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear(); /* too big for a long: bytes(...) raises, the Python path will too */
        return -1;
    }
    return (v >= 0 && v <= 255) ? (int)v : -1;
}

/* A fixed64 timestamp field: skipped when falsy, else masked to u64 as Python does. */
static int put_time(Buf *b, unsigned char tag, PyObject *obj)
{
    PyTypeObject *t = Py_TYPE(obj);
    unsigned long long v;
    char *p;
    if (obj == Py_None)
        return ENC_OK;
    if (t != &PyLong_Type && t != &PyBool_Type)
        return ENC_FALLBACK;
    v = PyLong_AsUnsignedLongLongMask(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return ENC_ERROR;
    /* Python tests the int, not its low 64 bits: 2**64 is written, as 0. */
    if (v == 0 && !PyObject_IsTrue(obj))
        return ENC_OK;
    if (buf_reserve(b, 9) < 0)
        return ENC_ERROR;
    p = b->p + b->len;
    *p++ = (char)tag;
    for (int i = 0; i < 8; i++)
        *p++ = (char)(v >> (8 * i)); /* little-endian, as struct "<Q" */
    b->len += 9;
    return ENC_OK;
}

static int put_raw(Buf *b, const char *tag2, PyObject *bytes)
{
    Py_ssize_t n = PyBytes_GET_SIZE(bytes);
    if (buf_reserve(b, 2 + n) < 0)
        return ENC_ERROR;
    memcpy(b->p + b->len, tag2, 2);
    memcpy(b->p + b->len + 2, PyBytes_AS_STRING(bytes), (size_t)n);
    b->len += 2 + n;
    return ENC_OK;
}

/* ScopeSpans.spans = 2: tag, length, the Span message, as encode_span writes it. Fields are
 * read in encode_span's order, each just before it is used, since a callback in between may
 * change the span. */
#define SPAN_HOLE 2
static int put_span(Buf *b, PyObject *span)
{
    Py_ssize_t start, body, body_len;
    PyObject *v, *status, *msg;
    const char *d;
    Py_ssize_t n;
    PyObject *own;
    int rc, code, k;
    char *p;

    if (buf_reserve(b, 1 + SPAN_HOLE) < 0)
        return ENC_ERROR;
    start = b->len;
    b->p[start] = 0x12;
    b->len += 1 + SPAN_HOLE;
    body = b->len;

    v = FIELD(span, F_TRACE_ID);
    if (v == NULL || !PyBytes_CheckExact(v))
        return ENC_FALLBACK;
    if (put_raw(b, "\x0a\x10", v) < 0) /* Span.trace_id = 1; b"".join takes any length */
        return ENC_ERROR;
    v = FIELD(span, F_SPAN_ID);
    if (v == NULL || !PyBytes_CheckExact(v))
        return ENC_FALLBACK;
    if (put_raw(b, "\x12\x08", v) < 0) /* Span.span_id = 2 */
        return ENC_ERROR;
    v = FIELD(span, F_PARENT_ID);
    if (v == NULL || (v != Py_None && !PyBytes_CheckExact(v)))
        return ENC_FALLBACK;
    if (v != Py_None && PyBytes_GET_SIZE(v) && put_raw(b, "\x22\x08", v) < 0)
        return ENC_ERROR; /* Span.parent_span_id = 4 */

    v = FIELD(span, F_NAME);
    if (v == NULL || (v != Py_None && !PyUnicode_CheckExact(v)))
        return ENC_FALLBACK;
    if (v != Py_None && PyUnicode_GET_LENGTH(v)) {
        if (utf8_of(v, &d, &n, &own) < 0)
            return ENC_ERROR;
        rc = buf_reserve(b, ld_size(n));
        if (rc == 0)
            b->len = put_ld(b->p + b->len, 0x2A, d, n) - b->p; /* Span.name = 5 */
        Py_XDECREF(own);
        if (rc < 0)
            return ENC_ERROR;
    }

    v = FIELD(span, F_KIND);
    if (v == NULL)
        return ENC_FALLBACK;
    if (v != Py_None) {
        code = small_code(v, kind_type);
        if (code < 0)
            return ENC_FALLBACK;
        if (code) {
            if (buf_reserve(b, 2) < 0)
                return ENC_ERROR;
            b->p[b->len++] = 0x30; /* Span.kind = 6 */
            b->p[b->len++] = (char)code;
        }
    }

    v = FIELD(span, F_START);
    if (v == NULL)
        return ENC_FALLBACK;
    if ((rc = put_time(b, 0x39, v)) != ENC_OK) /* Span.start_time_unix_nano = 7 */
        return rc;
    v = FIELD(span, F_END);
    if (v == NULL)
        return ENC_FALLBACK;
    if ((rc = put_time(b, 0x41, v)) != ENC_OK) /* Span.end_time_unix_nano = 8 */
        return rc;

    v = FIELD(span, F_ATTRIBUTES);
    if (v == NULL || (v != Py_None && !PyDict_CheckExact(v)))
        return ENC_FALLBACK;
    if (v != Py_None && PyDict_GET_SIZE(v)) {
        if ((rc = put_attributes(b, 0x4A, v)) != ENC_OK) /* Span.attributes = 9 */
            return rc;
    }

    status = FIELD(span, F_STATUS);
    msg = FIELD(span, F_STATUS_MESSAGE);
    if (status == NULL || msg == NULL || (msg != Py_None && !PyUnicode_CheckExact(msg)))
        return ENC_FALLBACK;
    code = -1; /* no code field */
    if (status != status_unset) {
        code = small_code(status, status_type);
        if (code < 0)
            return ENC_FALLBACK;
    }
    if (msg == Py_None || PyUnicode_GET_LENGTH(msg) == 0)
        msg = NULL;
    if (code >= 0 || msg != NULL) {
        Py_ssize_t st_len = code >= 0 ? 2 : 0;
        d = NULL;
        n = 0;
        own = NULL;
        if (msg != NULL) {
            if (utf8_of(msg, &d, &n, &own) < 0)
                return ENC_ERROR;
            st_len += ld_size(n);
        }
        rc = buf_reserve(b, ld_size(st_len));
        if (rc == 0) {
            p = b->p + b->len;
            *p++ = 0x7A; /* Span.status = 15 */
            p = put_varint(p, (uint64_t)st_len);
            if (msg != NULL)
                p = put_ld(p, 0x12, d, n); /* Status.message = 2 */
            if (code >= 0) {
                *p++ = 0x18; /* Status.code = 3 */
                *p++ = (char)code;
            }
            b->len = p - b->p;
        }
        Py_XDECREF(own);
        if (rc < 0)
            return ENC_ERROR;
    }

    /* Fill the length hole, moving the body when its length does not take SPAN_HOLE bytes. */
    body_len = b->len - body;
    k = varint_len((uint64_t)body_len);
    if (k > SPAN_HOLE && buf_reserve(b, k - SPAN_HOLE) < 0)
        return ENC_ERROR;
    if (k != SPAN_HOLE)
        memmove(b->p + body + (k - SPAN_HOLE), b->p + body, (size_t)body_len);
    put_varint(b->p + start + 1, (uint64_t)body_len);
    b->len = start + 1 + k + body_len;
    return ENC_OK;
}

/* --- the request ------------------------------------------------------------------------ */

typedef struct {
    PyObject *head; /* the Resource field (bytes, maybe empty) */
    Buf spans;      /* the group's ScopeSpans.spans fields */
} Group;

static PyObject *encode(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *spans, *scope, *schema, *index = NULL, *last_key = NULL, *out = NULL;
    Group *groups = NULL;
    Py_ssize_t ngroups = 0, capgroups = 0, last = -1, total = 0, i;
    int rc = ENC_OK;
    (void)self;

    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "encode() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    spans = args[0];
    scope = args[1];
    schema = args[2];
    if (!PyBytes_Check(scope) || !PyBytes_Check(schema)) {
        PyErr_SetString(PyExc_TypeError, "encode(spans, scope: bytes, schema: bytes)");
        return NULL;
    }
    if (span_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_fastwire.configure() was not called");
        return NULL;
    }
    /* Anything else might be a one-shot iterator: leave it unconsumed for the Python path. */
    if (!PyList_CheckExact(spans) && !PyTuple_CheckExact(spans))
        Py_RETURN_NONE;
    index = PyDict_New(); /* resource key -> group number, like the Python `groups` dict */
    if (index == NULL)
        return NULL;

    /* The size is read each time round: a list can change while callbacks run, and the
     * Python loop reads it live too. */
    for (i = 0; i < PySequence_Fast_GET_SIZE(spans); i++) {
        PyObject *span = PySequence_Fast_GET_ITEM(spans, i), *res, *key;
        Py_ssize_t g = 0;

        Py_INCREF(span);
        if (Py_TYPE(span) != span_type || (res = FIELD(span, F_RESOURCE)) == NULL) {
            Py_DECREF(span);
            rc = ENC_FALLBACK;
            break;
        }
        Py_INCREF(res);
        key = PyObject_GetAttr(res, str_key);
        Py_DECREF(res);
        if (key == NULL) {
            Py_DECREF(span);
            rc = ENC_ERROR;
            break;
        }
        if (key == last_key) {
            g = last; /* the usual case: consecutive spans of one process */
        } else {
            PyObject *found = PyDict_GetItemWithError(index, key);
            if (found != NULL) {
                g = PyLong_AsSsize_t(found);
            } else if (PyErr_Occurred()) {
                rc = ENC_ERROR;
            } else {
                PyObject *head = NULL, *num;
                if (ngroups == capgroups) {
                    Py_ssize_t cap = capgroups ? capgroups * 2 : 4;
                    Group *ng = PyMem_Realloc(groups, (size_t)cap * sizeof(Group));
                    if (ng == NULL) {
                        PyErr_NoMemory();
                        rc = ENC_ERROR;
                    } else {
                        groups = ng;
                        capgroups = cap;
                    }
                }
                if (rc == ENC_OK) {
                    head = PyObject_CallOneArg(heads_fn, span);
                    if (head == NULL) {
                        rc = ENC_ERROR;
                    } else if (!PyBytes_CheckExact(head)) {
                        Py_DECREF(head);
                        rc = ENC_FALLBACK;
                    }
                }
                if (rc == ENC_OK) {
                    g = ngroups++;
                    groups[g].head = head;
                    groups[g].spans.p = NULL;
                    groups[g].spans.len = 0;
                    /* A first guess of the size (spans of a few hundred bytes) saves most
                     * of the regrowing of a large batch. */
                    groups[g].spans.cap = 0;
                    if (g == 0 && buf_grow(&groups[g].spans,
                                           256 * PySequence_Fast_GET_SIZE(spans)) < 0)
                        rc = ENC_ERROR;
                    num = rc == ENC_OK ? PyLong_FromSsize_t(g) : NULL;
                    if (num == NULL || PyDict_SetItem(index, key, num) < 0)
                        rc = ENC_ERROR;
                    Py_XDECREF(num);
                }
            }
            if (rc != ENC_OK) {
                Py_DECREF(key);
                Py_DECREF(span);
                break;
            }
            Py_XSETREF(last_key, key);
            Py_INCREF(key);
            last = g;
        }
        Py_DECREF(key);
        rc = put_span(&groups[g].spans, span);
        Py_DECREF(span);
        if (rc != ENC_OK)
            break;
    }

    if (rc == ENC_OK) {
        Py_ssize_t sc = PyBytes_GET_SIZE(scope), sh = PyBytes_GET_SIZE(schema);
        char *p;
        /* request.resource_spans = 1 { head, scope_spans = 2 { scope, spans, schema }, schema } */
        for (i = 0; i < ngroups; i++) {
            Py_ssize_t ss = sc + groups[i].spans.len + sh;
            Py_ssize_t rs = PyBytes_GET_SIZE(groups[i].head) + ld_size(ss) + sh;
            total += ld_size(rs);
        }
        out = PyBytes_FromStringAndSize(NULL, total);
        if (out != NULL) {
            p = PyBytes_AS_STRING(out);
            for (i = 0; i < ngroups; i++) {
                Py_ssize_t hn = PyBytes_GET_SIZE(groups[i].head);
                Py_ssize_t ss = sc + groups[i].spans.len + sh;
                Py_ssize_t rs = hn + ld_size(ss) + sh;
                *p++ = 0x0A;
                p = put_varint(p, (uint64_t)rs);
                memcpy(p, PyBytes_AS_STRING(groups[i].head), (size_t)hn);
                p += hn;
                *p++ = 0x12;
                p = put_varint(p, (uint64_t)ss);
                memcpy(p, PyBytes_AS_STRING(scope), (size_t)sc);
                p += sc;
                if (groups[i].spans.len) {
                    memcpy(p, groups[i].spans.p, (size_t)groups[i].spans.len);
                    p += groups[i].spans.len;
                }
                memcpy(p, PyBytes_AS_STRING(schema), (size_t)sh);
                p += sh;
                memcpy(p, PyBytes_AS_STRING(schema), (size_t)sh);
                p += sh;
            }
        }
    } else if (rc == ENC_FALLBACK) {
        out = Py_None;
        Py_INCREF(out);
    }
    for (i = 0; i < ngroups; i++) {
        Py_DECREF(groups[i].head);
        PyMem_Free(groups[i].spans.p);
    }
    PyMem_Free(groups);
    Py_XDECREF(last_key);
    Py_DECREF(index);
    return out;
}

/* --- configure -------------------------------------------------------------------------- */

static int set_type(PyTypeObject **slot, PyObject *obj, const char *what)
{
    if (!PyType_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "configure: %s must be a type", what);
        return -1;
    }
    Py_INCREF(obj);
    Py_XSETREF(*slot, (PyTypeObject *)obj);
    return 0;
}

static PyObject *configure(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"span_type", "kind_type", "status_type", "status_unset",
                             "any_value", "heads", NULL};
    PyObject *st, *kt, *sct, *unset, *anyv, *heads;
    Py_ssize_t off[N_FIELDS];
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "$OOOOOO:configure", kwlist, &st, &kt, &sct,
                                     &unset, &anyv, &heads))
        return NULL;
    if (!PyCallable_Check(anyv) || !PyCallable_Check(heads)) {
        PyErr_SetString(PyExc_TypeError, "configure: any_value and heads must be callable");
        return NULL;
    }
    if (!PyType_Check(st)) {
        PyErr_SetString(PyExc_TypeError, "configure: span_type must be a type");
        return NULL;
    }
    /* Every field must be a plain object slot of the type itself: then FIELD() reads what
     * attribute access would return (NULL when unset, where Python raises AttributeError). */
    for (int f = 0; f < N_FIELDS; f++) {
        /* On the class, a member descriptor's __get__ returns the descriptor itself. */
        PyObject *d = PyObject_GetAttrString(st, field_names[f]);
        PyMemberDef *m;
        int ok;
        if (d == NULL)
            return NULL;
        ok = Py_IS_TYPE(d, &PyMemberDescr_Type);
        m = ok ? ((PyMemberDescrObject *)d)->d_member : NULL;
        ok = ok && ((PyMemberDescrObject *)d)->d_common.d_type == (PyTypeObject *)st;
        Py_DECREF(d); /* the type keeps it alive */
        if (!ok || m->type != Py_T_OBJECT_EX || m->offset <= 0) {
            PyErr_Format(PyExc_TypeError, "configure: %s.%s is not an object slot",
                         ((PyTypeObject *)st)->tp_name, field_names[f]);
            return NULL;
        }
        off[f] = m->offset;
    }
    if (set_type(&span_type, st, "span_type") < 0 || set_type(&kind_type, kt, "kind_type") < 0 ||
        set_type(&status_type, sct, "status_type") < 0)
        return NULL;
    memcpy(field_off, off, sizeof off);
    Py_INCREF(unset);
    Py_XSETREF(status_unset, unset);
    Py_INCREF(anyv);
    Py_XSETREF(any_value_fn, anyv);
    Py_INCREF(heads);
    Py_XSETREF(heads_fn, heads);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"encode", (PyCFunction)(void (*)(void))encode, METH_FASTCALL,
     "encode(spans, scope, schema) -> bytes | None: the ExportTraceServiceRequest bytes of\n"
     "otlp_wire.encode_export_request_py(spans), or None for input left to it."},
    {"configure", (PyCFunction)(void (*)(void))configure, METH_VARARGS | METH_KEYWORDS,
     "configure(*, span_type, kind_type, status_type, status_unset, any_value, heads):\n"
     "the model types and the Python helpers encode() relies on."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastwire",
    "The OTLP protobuf wire encoder's per-span work in C (see kernel_side.export.otlp_wire).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastwire(void)
{
    str_key = PyUnicode_InternFromString("key");
    if (str_key == NULL)
        return NULL;
    return PyModule_Create(&module);
}
