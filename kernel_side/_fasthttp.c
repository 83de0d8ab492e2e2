/* Optional accelerator for the HTTP/1.x head parser (kernel_side.protocols.http1).
 *
 * The pure-Python parser costs about 8 us per exchange on the 2-core VM (5 us for the request,
 * 3 us for the response), the largest share of the agent's CPU per span. This module parses
 * the shapes real traffic has in C, with the same results field for field:
 *
 *   - requests in origin form ("/path?query") whose request line ended inside the capture,
 *     with no Transfer-Encoding, at most one plain Content-Length and no X-Forwarded-For;
 *   - responses whose status line ended inside the capture, with no Transfer-Encoding and at
 *     most one plain Content-Length.
 *
 * Cut header blocks, pipelined messages, bodies past the capture and connection-delimited
 * responses are all in that set. For anything else (a chunked body, a repeated or odd
 * Content-Length, an absolute-form target, a request line cut mid-way, an argument of an
 * unexpected type) the whole buffer goes to the Python parser, so every rare rule exists once,
 * in Python. tests/unit/test_http1_fast.py holds the two to identical output on the unit
 * corpus and on 200,000 mutated buffers.
 *
 * The Python parser searches a lowercased copy of the header block for "\n<name>:". Every
 * match starts at a line feed, so one pass over the block's line starts with an ASCII
 * case-insensitive compare finds the same first match and count for every header used,
 * without the copy.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <string.h>

#include "_slots.h"

#define MAX_VALUE_LEN 1024
#define MAX_METHOD_LEN 7
#define MAX_LENGTH (1LL << 53)

static PyObject *request_cls, *response_cls, *requests_py, *responses_py;
/* HttpRequest and HttpResponse built without their dataclass __init__ (see _slots.h). */
static slot_maker request_maker, response_maker;
static PyObject *s_versions[10];
/* Buffers parsed here and buffers handed to the Python parser, for tests and diagnostics. */
static unsigned long long n_fast, n_fallback;
static PyObject *s_methods[9];
static const char *const method_names[9] = {"GET", "HEAD", "POST", "PUT", "DELETE",
                                            "CONNECT", "OPTIONS", "TRACE", "PATCH"};

/* Headers looked up, each as "\n<name>:" in lowercase. */
enum { H_HOST, H_TRACEPARENT, H_USER_AGENT, H_XFF, H_CONTENT_LENGTH, H_TRANSFER_ENCODING, H_N };
static const struct {
    const char *pat;
    Py_ssize_t len;
} headers[H_N] = {
    [H_HOST] = {"\nhost:", 6},
    [H_TRACEPARENT] = {"\ntraceparent:", 13},
    [H_USER_AGENT] = {"\nuser-agent:", 12},
    [H_XFF] = {"\nx-forwarded-for:", 17},
    [H_CONTENT_LENGTH] = {"\ncontent-length:", 16},
    [H_TRANSFER_ENCODING] = {"\ntransfer-encoding:", 19},
};

/* One located message head: the start line and the header block (from the LF ending the
 * start line through the LF ending the last header line kept), as http1._locate_head finds
 * them. Offsets are into the captured buffer. */
typedef struct {
    Py_ssize_t line_start, line_end; /* start line, without its LF */
    int line_complete;
    Py_ssize_t block_start, block_end;
    int complete;   /* the empty line ending the head is inside the capture */
    Py_ssize_t end; /* where the body starts (len(data) when incomplete) */
    Py_ssize_t first[H_N]; /* offset of the value after "<name>:", or -1 */
    int count[H_N];
} head_t;

/* Memo of the head-end searches across one buffer (http1._find_head_end's ``absent``, plus
 * the last "\n\r\n" found): a pattern with no match after one position has none after a later
 * one, and a match after the current position is still the first one. */
typedef struct {
    Py_ssize_t crlf; /* last "\n\r\n" found, -1 when none yet */
    int crlf_absent, lf_absent;
} scan_t;

static inline unsigned char lower(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
}

static inline int is_ws(unsigned char c)
{
    /* bytes.split()'s whitespace */
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

static Py_ssize_t find(const char *d, Py_ssize_t from, Py_ssize_t to, const char *pat,
                       Py_ssize_t plen)
{
    if (from < 0 || to - from < plen)
        return -1;
    const char *p = memmem(d + from, (size_t)(to - from), pat, (size_t)plen);
    return p ? p - d : -1;
}

static Py_ssize_t find_lf(const char *d, Py_ssize_t from, Py_ssize_t to)
{
    if (from >= to)
        return -1;
    const char *p = memchr(d + from, '\n', (size_t)(to - from));
    return p ? p - d : -1;
}

/* Whether header ``which`` ("\n<name>:") starts at the line feed at ``i``; counts it. */
static int match_header(const char *d, Py_ssize_t i, Py_ssize_t block_end, int which, head_t *h)
{
    Py_ssize_t len = headers[which].len;
    if (block_end - i < len)
        return 0;
    const char *pat = headers[which].pat;
    for (Py_ssize_t k = 1; k < len; k++)
        if (lower((unsigned char)d[i + k]) != (unsigned char)pat[k])
            return 0;
    if (h->count[which]++ == 0)
        h->first[which] = i + len;
    return 1;
}

static void locate_head(const char *d, Py_ssize_t n, Py_ssize_t pos, scan_t *scan, head_t *h)
{
    Py_ssize_t block_end = -1, head_end = -1;
    Py_ssize_t crlf = -1;
    if (!scan->crlf_absent) {
        if (scan->crlf >= pos)
            crlf = scan->crlf;
        else {
            crlf = find(d, pos, n, "\n\r\n", 3);
            scan->crlf = crlf;
        }
    }
    if (crlf >= 0) {
        Py_ssize_t lf = find(d, pos, crlf + 1, "\n\n", 2);
        if (lf < 0) {
            block_end = crlf + 1;
            head_end = crlf + 3;
        } else {
            block_end = lf + 1;
            head_end = lf + 2;
        }
    } else {
        scan->crlf_absent = 1;
        Py_ssize_t lf = scan->lf_absent ? -1 : find(d, pos, n, "\n\n", 2);
        if (lf < 0)
            scan->lf_absent = 1;
        else {
            block_end = lf + 1;
            head_end = lf + 2;
        }
    }
    h->complete = head_end >= 0;
    for (int i = 0; i < H_N; i++) {
        h->first[i] = -1;
        h->count[i] = 0;
    }
    h->line_start = pos;
    if (!h->complete) {
        const char *last = memrchr(d + pos, '\n', (size_t)(n - pos));
        if (last == NULL) {
            /* Not even the start line ended inside the capture. */
            h->line_end = n;
            h->line_complete = 0;
            h->block_start = h->block_end = n;
            h->end = n;
            return;
        }
        block_end = last - d + 1;
        head_end = n;
    }
    h->line_complete = 1;
    h->line_end = find_lf(d, pos, block_end);
    h->block_start = h->line_end;
    h->block_end = block_end;
    h->end = head_end;
    /* Every "\n<name>:" match starts at one of the block's line feeds. */
    Py_ssize_t i = h->block_start;
    while (i >= 0 && i < block_end) {
        if (i + 1 < block_end) {
            switch (lower((unsigned char)d[i + 1])) {
            case 'h': match_header(d, i, block_end, H_HOST, h); break;
            case 't':
                /* "\ntra": traceparent or transfer-encoding */
                if (!match_header(d, i, block_end, H_TRACEPARENT, h))
                    match_header(d, i, block_end, H_TRANSFER_ENCODING, h);
                break;
            case 'u': match_header(d, i, block_end, H_USER_AGENT, h); break;
            case 'x': match_header(d, i, block_end, H_XFF, h); break;
            case 'c': match_header(d, i, block_end, H_CONTENT_LENGTH, h); break;
            default: break;
            }
        }
        i = find_lf(d, i + 1, block_end);
    }
}

/* The value of a header found at ``start``: up to the next LF, stripped of " \t\r". */
static void header_value(const char *d, const head_t *h, Py_ssize_t start, Py_ssize_t *vs,
                         Py_ssize_t *ve)
{
    Py_ssize_t e = find_lf(d, start, h->block_end);
    if (e < 0)
        e = h->block_end; /* unreachable: the block ends with a LF */
    while (start < e && (d[start] == ' ' || d[start] == '\t' || d[start] == '\r'))
        start++;
    while (e > start && (d[e - 1] == ' ' || d[e - 1] == '\t' || d[e - 1] == '\r'))
        e--;
    *vs = start;
    *ve = e;
}

/* http1._text: UTF-8 with replacement, at most MAX_VALUE_LEN bytes (so characters) kept. */
static PyObject *text(const char *s, Py_ssize_t len)
{
    if (len > MAX_VALUE_LEN)
        len = MAX_VALUE_LEN;
    return PyUnicode_DecodeUTF8(s, len, "replace");
}

static PyObject *header_text(const char *d, const head_t *h, int which)
{
    Py_ssize_t vs, ve;
    header_value(d, h, h->first[which], &vs, &ve);
    return text(d + vs, ve - vs);
}

/* Content-Length framing when it is one plain decimal value; 0 when absent; -1 when the value
 * needs the Python rules (a list, a bogus value, repeated headers). */
static int content_length(const char *d, const head_t *h, long long *out)
{
    if (h->count[H_CONTENT_LENGTH] == 0)
        return 0;
    if (h->count[H_CONTENT_LENGTH] > 1)
        return -1;
    Py_ssize_t vs, ve;
    header_value(d, h, h->first[H_CONTENT_LENGTH], &vs, &ve);
    if (ve <= vs || ve - vs > 16)
        return -1;
    long long v = 0;
    for (Py_ssize_t i = vs; i < ve; i++) {
        if (d[i] < '0' || d[i] > '9')
            return -1;
        v = v * 10 + (d[i] - '0');
    }
    if (v > MAX_LENGTH)
        return -1;
    *out = v;
    return 1;
}

/* A body of ``body`` bytes after head ``h``: its size is known, and where the message ends
 * is known when the head is complete (a cut head may have lost lines before the body). */
typedef struct {
    long long size, end;
    int size_known, end_known;
} framing_t;

static framing_t framed(const head_t *h, long long body)
{
    framing_t f = {body, 0, 1, 0};
    if (h->complete) {
        f.end = (long long)h->end + body;
        f.end_known = 1;
    }
    return f;
}

static Py_ssize_t skip_blank_lines(const char *d, Py_ssize_t pos, Py_ssize_t n)
{
    while (pos < n && (d[pos] == '\r' || d[pos] == '\n'))
        pos++;
    return pos;
}

static int method_index(const char *s, Py_ssize_t len)
{
    for (int i = 0; i < 9; i++)
        if ((Py_ssize_t)strlen(method_names[i]) == len && memcmp(method_names[i], s, (size_t)len) == 0)
            return i;
    return -1;
}

/* "HTTP/1.<digit>" -> index of the cached "1.<digit>", or -1. */
static int version_index(const char *s, Py_ssize_t len)
{
    if (len == 8 && memcmp(s, "HTTP/1.", 7) == 0 && s[7] >= '0' && s[7] <= '9')
        return s[7] - '0';
    return -1;
}

static int get_total(PyObject *obj, long long *out)
{
    if (!PyLong_CheckExact(obj))
        return -1;
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return -1;
    }
    *out = v;
    return 0;
}

static PyObject *maybe_long(int known, long long v)
{
    if (!known)
        Py_RETURN_NONE;
    return PyLong_FromLongLong(v);
}

#define FALLBACK (-2)

/* The same call to the Python parser, for a buffer (or arguments) this module does not take. */
static PyObject *fallback_call(PyObject *fn, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames)
{
    n_fallback++;
    if (fn == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_fasthttp.configure() was not called");
        return NULL;
    }
    return PyObject_Vectorcall(fn, args, (size_t)nargs, kwnames);
}

/* Append one request record; FALLBACK when the message needs the Python rules, -1 on error,
 * else 0 with *next set (-1: stop). */
static int one_request(PyObject *out, const char *d, Py_ssize_t n, Py_ssize_t pos, int truncated,
                       scan_t *scan, Py_ssize_t *next)
{
    head_t h;
    *next = -1;
    locate_head(d, n, pos, scan, &h);
    if (!h.line_complete)
        return truncated ? FALLBACK : 0;
    /* Split the start line on whitespace; exactly three fields. */
    Py_ssize_t fs[3], fe[3];
    int nf = 0;
    Py_ssize_t i = h.line_start;
    while (i < h.line_end) {
        while (i < h.line_end && is_ws((unsigned char)d[i]))
            i++;
        if (i >= h.line_end)
            break;
        if (nf == 3)
            return 0; /* more than three fields */
        fs[nf] = i;
        while (i < h.line_end && !is_ws((unsigned char)d[i]))
            i++;
        fe[nf++] = i;
    }
    if (nf != 3)
        return 0;
    int m = method_index(d + fs[0], fe[0] - fs[0]);
    int v = version_index(d + fs[2], fe[2] - fs[2]);
    if (m < 0 || v < 0)
        return 0;
    if (d[fs[1]] != '/')
        return FALLBACK; /* absolute, authority or asterisk form */
    if (h.count[H_TRANSFER_ENCODING] || h.count[H_XFF])
        return FALLBACK;
    long long clen = 0;
    int has_cl = content_length(d, &h, &clen);
    if (has_cl < 0)
        return FALLBACK;

    int rc = -1;
    PyObject *target = NULL, *path = NULL, *query = NULL, *host = NULL, *tp = NULL, *ua = NULL;
    PyObject *body = NULL, *length = NULL, *offset = NULL, *rec = NULL;
    target = text(d + fs[1], fe[1] - fs[1]);
    if (target == NULL)
        goto done;
    Py_ssize_t tlen = PyUnicode_GET_LENGTH(target);
    Py_ssize_t q = PyUnicode_FindChar(target, '?', 0, tlen, 1);
    if (q == -2)
        goto done;
    if (q < 0) {
        path = Py_NewRef(target);
        query = Py_NewRef(Py_None);
    } else {
        path = PyUnicode_Substring(target, 0, q);
        query = PyUnicode_Substring(target, q + 1, tlen);
        if (path == NULL || query == NULL)
            goto done;
    }
    /* No framing header: a complete head ends the request; a cut one may have lost it. */
    framing_t f = {0, 0, 0, 0};
    if (has_cl)
        f = framed(&h, clen);
    else if (h.complete)
        f = framed(&h, 0);
    host = h.first[H_HOST] >= 0 ? header_text(d, &h, H_HOST) : Py_NewRef(Py_None);
    /* W3C trace context: more than one traceparent makes the context invalid. */
    tp = h.count[H_TRACEPARENT] == 1 ? header_text(d, &h, H_TRACEPARENT) : Py_NewRef(Py_None);
    ua = h.first[H_USER_AGENT] >= 0 ? header_text(d, &h, H_USER_AGENT) : Py_NewRef(Py_None);
    body = maybe_long(f.size_known, f.size);
    length = maybe_long(f.end_known, f.end - pos);
    offset = PyLong_FromSsize_t(pos);
    if (host == NULL || tp == NULL || ua == NULL || body == NULL || length == NULL ||
        offset == NULL)
        goto done;
    PyObject *args[14] = {s_methods[m], target, path, query, s_versions[v], host, tp, ua,
                          Py_None, body, Py_False, h.complete ? Py_True : Py_False, offset,
                          length};
    rec = request_maker.type != NULL ? slot_make(&request_maker, args)
                                     : PyObject_Vectorcall(request_cls, args, 14, NULL);
    if (rec == NULL || PyList_Append(out, rec) < 0)
        goto done;
    rc = 0;
    if (f.end_known)
        *next = f.end < (long long)n ? (Py_ssize_t)f.end : n;
done:
    Py_XDECREF(target);
    Py_XDECREF(path);
    Py_XDECREF(query);
    Py_XDECREF(host);
    Py_XDECREF(tp);
    Py_XDECREF(ua);
    Py_XDECREF(body);
    Py_XDECREF(length);
    Py_XDECREF(offset);
    Py_XDECREF(rec);
    return rc;
}

static PyObject *parse_requests(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames)
{
    (void)self;
    long long total;
    if (kwnames != NULL || nargs != 2 || request_cls == NULL || !PyBytes_CheckExact(args[0]) ||
        get_total(args[1], &total) < 0)
        goto fallback;
    const char *d = PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    int truncated = total > (long long)n;
    scan_t scan = {-1, 0, 0};
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    Py_ssize_t pos = (n && (d[0] == '\r' || d[0] == '\n')) ? skip_blank_lines(d, 0, n) : 0;
    while (pos < n) {
        Py_ssize_t lim = pos + MAX_METHOD_LEN + 1 < n ? pos + MAX_METHOD_LEN + 1 : n;
        const char *sp = memchr(d + pos, ' ', (size_t)(lim - pos));
        if (sp == NULL || sp == d + pos || method_index(d + pos, sp - (d + pos)) < 0)
            break;
        Py_ssize_t next;
        int rc = one_request(out, d, n, pos, truncated, &scan, &next);
        if (rc == FALLBACK) {
            Py_DECREF(out);
            goto fallback;
        }
        if (rc < 0) {
            Py_DECREF(out);
            return NULL;
        }
        if (next < 0 || next >= n)
            break;
        pos = (d[next] == '\r' || d[next] == '\n') ? skip_blank_lines(d, next, n) : next;
    }
    n_fast++;
    return out;
fallback:
    return fallback_call(requests_py, args, nargs, kwnames);
}

/* http1.looks_like_request: a known method token, then a space, at the very start. The agent
 * asks this of every exchange before choosing a parser. */
static PyObject *looks_like_request(PyObject *self, PyObject *arg)
{
    (void)self;
    if (!PyBytes_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "looks_like_request() takes bytes, not %.100s",
                     Py_TYPE(arg)->tp_name);
        return NULL;
    }
    const char *d = PyBytes_AS_STRING(arg);
    Py_ssize_t n = PyBytes_GET_SIZE(arg);
    Py_ssize_t lim = n < MAX_METHOD_LEN + 1 ? n : MAX_METHOD_LEN + 1;
    const char *sp = lim > 0 ? memchr(d, ' ', (size_t)lim) : NULL;
    return PyBool_FromLong(sp != NULL && sp != d && method_index(d, sp - d) >= 0);
}

/* looks_like_response on data[pos:pos+12]. */
static int sniff_response(const char *d, Py_ssize_t n, Py_ssize_t pos)
{
    const char *p = d + pos;
    return n - pos >= 12 && memcmp(p, "HTTP/1.", 7) == 0 && p[7] >= '0' && p[7] <= '9' &&
           p[8] == ' ' && p[9] >= '0' && p[9] <= '9' && p[10] >= '0' && p[10] <= '9' &&
           p[11] >= '0' && p[11] <= '9';
}

static PyObject *parse_responses(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames)
{
    (void)self;
    long long total;
    PyObject *methods = NULL, *out = NULL;
    if (kwnames != NULL || nargs < 2 || nargs > 3 || response_cls == NULL || !PyBytes_CheckExact(args[0]) ||
        get_total(args[1], &total) < 0)
        goto fallback;
    if (nargs == 3 && !PyList_CheckExact(args[2]) && !PyTuple_CheckExact(args[2]))
        goto fallback;
    const char *d = PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    if (total < (long long)n)
        total = n;
    int truncated = total > (long long)n;
    Py_ssize_t n_methods = 0;
    if (nargs == 3) {
        methods = args[2];
        n_methods = PySequence_Fast_GET_SIZE(methods);
    }
    scan_t scan = {-1, 0, 0};
    out = PyList_New(0);
    if (out == NULL)
        return NULL;
    Py_ssize_t final_index = 0;
    Py_ssize_t pos = 0;
    while (pos < n && sniff_response(d, n, pos)) {
        head_t h;
        locate_head(d, n, pos, &scan, &h);
        if (!h.line_complete) {
            if (truncated)
                goto fallback_out;
            break;
        }
        /* "HTTP/1.d SSS[ reason]": the first space is at offset 8. */
        Py_ssize_t tok = pos + 9;
        const char *sp = memchr(d + tok, ' ', (size_t)(h.line_end - tok));
        Py_ssize_t tok_end = sp ? sp - d : h.line_end;
        Py_ssize_t reason_start = sp ? tok_end + 1 : h.line_end;
        Py_ssize_t stripped = tok_end;
        while (stripped > tok && d[stripped - 1] == '\r')
            stripped--;
        if (stripped - tok != 3)
            break;
        int status = (d[tok] - '0') * 100 + (d[tok + 1] - '0') * 10 + (d[tok + 2] - '0');
        if (status < 100)
            break;
        int interim = status >= 100 && status < 200 && status != 101;
        int head_req = 0, connect = 0;
        if (!interim) {
            if (final_index < n_methods) {
                PyObject *m = PySequence_Fast_GET_ITEM(methods, final_index);
                if (!PyUnicode_CheckExact(m))
                    goto fallback_out;
                head_req = PyUnicode_CompareWithASCIIString(m, "HEAD") == 0;
                connect = PyUnicode_CompareWithASCIIString(m, "CONNECT") == 0;
            }
            final_index++;
        }
        /* After 101 or a successful CONNECT the connection carries another protocol. */
        int tunnel = status == 101 || (connect && status >= 200 && status < 300);
        framing_t f = {0, 0, 0, 0};
        if (interim || tunnel || status == 204 || status == 304 || head_req) {
            f = framed(&h, 0);
        } else {
            if (h.count[H_TRANSFER_ENCODING])
                goto fallback_out;
            long long clen = 0;
            int has_cl = content_length(d, &h, &clen);
            if (has_cl < 0)
                goto fallback_out;
            if (has_cl) {
                f = framed(&h, clen);
            } else {
                /* Delimited by close: everything else this exchange carried is body. */
                tunnel = 1;
                if (h.complete)
                    f = framed(&h, total - (long long)h.end);
            }
        }
        while (reason_start < h.line_end &&
               (d[reason_start] == ' ' || d[reason_start] == '\t' || d[reason_start] == '\r'))
            reason_start++;
        Py_ssize_t reason_end = h.line_end;
        while (reason_end > reason_start && (d[reason_end - 1] == ' ' ||
                                             d[reason_end - 1] == '\t' ||
                                             d[reason_end - 1] == '\r'))
            reason_end--;
        PyObject *st = PyLong_FromLong(status);
        PyObject *reason = text(d + reason_start, reason_end - reason_start);
        PyObject *body = maybe_long(f.size_known, f.size);
        PyObject *length = maybe_long(f.end_known, f.end - pos);
        PyObject *offset = PyLong_FromSsize_t(pos);
        PyObject *rec = NULL;
        if (st && reason && body && length && offset) {
            PyObject *rargs[8] = {st, reason, s_versions[d[pos + 7] - '0'], body, Py_False,
                                  h.complete ? Py_True : Py_False, offset, length};
            rec = response_maker.type != NULL ? slot_make(&response_maker, rargs)
                                              : PyObject_Vectorcall(response_cls, rargs, 8, NULL);
        }
        Py_XDECREF(st);
        Py_XDECREF(reason);
        Py_XDECREF(body);
        Py_XDECREF(length);
        Py_XDECREF(offset);
        if (rec == NULL || PyList_Append(out, rec) < 0) {
            Py_XDECREF(rec);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(rec);
        if (!f.end_known || tunnel || f.end >= (long long)n)
            break;
        pos = (Py_ssize_t)f.end;
    }
    n_fast++;
    return out;
fallback_out:
    Py_DECREF(out);
fallback:
    return fallback_call(responses_py, args, nargs, kwnames);
}

static PyObject *configure(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *rq, *rs, *fq, *fs;
    if (!PyArg_ParseTuple(args, "OOOO:configure", &rq, &rs, &fq, &fs))
        return NULL;
    if (!PyCallable_Check(rq) || !PyCallable_Check(rs) || !PyCallable_Check(fq) ||
        !PyCallable_Check(fs)) {
        PyErr_SetString(PyExc_TypeError, "configure() takes four callables");
        return NULL;
    }
    slot_maker_clear(&request_maker);
    slot_maker_clear(&response_maker);
    if (slot_maker_init(&request_maker, rq, 14) < 0 || slot_maker_init(&response_maker, rs, 8) < 0)
        return NULL;
    Py_XSETREF(request_cls, Py_NewRef(rq));
    Py_XSETREF(response_cls, Py_NewRef(rs));
    Py_XSETREF(requests_py, Py_NewRef(fq));
    Py_XSETREF(responses_py, Py_NewRef(fs));
    Py_RETURN_NONE;
}

static PyObject *counts(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return Py_BuildValue("(KK)", n_fast, n_fallback);
}

static PyObject *direct_records(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return Py_BuildValue("(OO)", request_maker.type != NULL ? Py_True : Py_False,
                         response_maker.type != NULL ? Py_True : Py_False);
}

static PyMethodDef methods_def[] = {
    {"direct_records", direct_records, METH_NOARGS,
     "direct_records() -> (requests, responses): whether each record type is built by storing "
     "its slots directly (else by calling the class)."},
    {"counts", counts, METH_NOARGS,
     "counts() -> (buffers parsed in C, buffers handed to the Python parser) since import."},
    {"configure", configure, METH_VARARGS,
     "configure(HttpRequest, HttpResponse, parse_requests_py, parse_responses_py): the record\n"
     "types to build and the pure-Python parsers that take every buffer this module does not."},
    {"looks_like_request", looks_like_request, METH_O,
     "looks_like_request(data) -> bool, as http1.looks_like_request_py."},
    {"parse_requests", (PyCFunction)(void (*)(void))parse_requests, METH_FASTCALL | METH_KEYWORDS,
     "parse_requests(data, total_len) -> list[HttpRequest], as http1.parse_requests."},
    {"parse_responses", (PyCFunction)(void (*)(void))parse_responses, METH_FASTCALL | METH_KEYWORDS,
     "parse_responses(data, total_len, request_methods=()) -> list[HttpResponse], as\n"
     "http1.parse_responses."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fasthttp",
    "Optional C parser for the common HTTP/1.x heads; see kernel_side.protocols.http1.", -1,
    methods_def, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fasthttp(void)
{
    for (int i = 0; i < 10; i++) {
        char v[4] = {'1', '.', (char)('0' + i), 0};
        s_versions[i] = PyUnicode_InternFromString(v);
        if (s_versions[i] == NULL)
            return NULL;
    }
    for (int i = 0; i < 9; i++) {
        s_methods[i] = PyUnicode_InternFromString(method_names[i]);
        if (s_methods[i] == NULL)
            return NULL;
    }
    return PyModule_Create(&module);
}
