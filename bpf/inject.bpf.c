/* ebpf-bridge traceparent injector (opt-in, --inject-traceparent).
 *
 * A sock_ops program on the cgroup v2 root puts the TCP connections that selected processes
 * open (connect(2) seen in process context, TCP_CONNECT_CB) into a sockhash once they are
 * established. An sk_msg verdict program on that sockhash runs inside the sending process's
 * sendmsg/write: when the message starts a well-formed HTTP/1.1 request head, the whole head is
 * visible and it carries no traceparent, it inserts
 *     "traceparent: 00-<trace id>-<span id>-01\r\n"
 * right after the request line with bpf_msg_push_data. Anything else passes untouched.
 *
 * The ids are the ones the agent will give the request's CLIENT span: this program allocates the
 * exchange id (from a range the agent's own counter never reaches), derives the span and trace
 * ids with the agent's per-run salt exactly as kernel_side/assembly.py IdSource does
 * (splitmix64), and hands the exchange id to agent.bpf.c's start_exchange through inject_ids,
 * keyed by thread: the agent's sys_exit of the same write consumes it.
 *
 * STATUS (issue 7, work in progress, not loaded by anything yet): all three programs load with
 * HEAD_CAP=16; from HEAD_CAP=32 the verifier stops inject_msg at 1,000,001 processed insns
 * (E2BIG): the per-byte head scan splits states. Needs a scan the verifier can prune (or a
 * bpf_loop callback, which BCC 0.26 cannot relocate) before it is wired into the agent.
 *
 * Loader defines: HEAD_CAP (power of two), PIN_INJECT_IDS, PIN_ACTIVE_SERVER, SOCK_MAX.
 */
#include <uapi/linux/bpf.h>

#ifndef HEAD_CAP
#define HEAD_CAP 1024
#endif

#define TP_LEN 70 /* "traceparent: 00-" 16 + 32 + "-" + 16 + "-01\r\n" */
#define ID_BASE (1ULL << 47)

#define AF_INET_ 2
#define AF_INET6_ 10

/* per-connection mode */
#define M_BOUNDARY 0 /* the next message starts a request */
#define M_BODY 1     /* body_left bytes of the current request's body are still to come */
#define M_LOST 2     /* cannot tell where requests start (chunked, upgrade, not HTTP): hands off */

/* stats slots; kernel_side/inject.py names them */
#define IS_INJECTED 0
#define IS_PRESENT 1
#define IS_NOT_HTTP 2
#define IS_INCOMPLETE 3
#define IS_NESTED 4
#define IS_BODY 5
#define IS_LOST 6
#define IS_FAILED 7
#define IS_PIPELINED 8
#define IS_SOCKETS 9
#define IS_SLOTS 10

struct inject_cfg {
    __u64 s1;
    __u64 s2;
    __u64 s3;
};

/* sk_msg has no socket cookie here: the connection state is keyed by its 4-tuple, read from
 * the same fields (same byte orders) in both programs. */
struct tuple_key {
    __u32 raddr[4];
    __u32 laddr[4];
    __u32 rport;
    __u32 lport;
};

#define TUPLE_OF(ctx, k)                                   \
    do {                                                   \
        if ((ctx)->family == AF_INET_) {                   \
            (k).raddr[0] = (ctx)->remote_ip4;              \
            (k).laddr[0] = (ctx)->local_ip4;               \
        } else {                                           \
            (k).raddr[0] = (ctx)->remote_ip6[0];           \
            (k).raddr[1] = (ctx)->remote_ip6[1];           \
            (k).raddr[2] = (ctx)->remote_ip6[2];           \
            (k).raddr[3] = (ctx)->remote_ip6[3];           \
            (k).laddr[0] = (ctx)->local_ip6[0];            \
            (k).laddr[1] = (ctx)->local_ip6[1];            \
            (k).laddr[2] = (ctx)->local_ip6[2];            \
            (k).laddr[3] = (ctx)->local_ip6[3];            \
        }                                                  \
        (k).rport = (ctx)->remote_port;                    \
        (k).lport = (ctx)->local_port;                     \
    } while (0)

struct conn_state {
    __u64 body_left;
    __u32 rcv_mark; /* bytes_received when the last request was injected */
    __u8 mode;
    __u8 injected;
    __u16 _pad;
};

BPF_ARRAY(inject_cfg, struct inject_cfg, 1);
BPF_HASH(procs_inject, __u32, __u8, 16384);
BPF_SOCKHASH(inject_socks, __u64, 65536);
BPF_TABLE("lru_hash", __u64, __u8, inject_pending, 65536);
BPF_TABLE("lru_hash", struct tuple_key, struct conn_state, inject_conns, 65536);
BPF_ARRAY(inject_counter, __u64, 1);
BPF_PERCPU_ARRAY(inject_stats, __u64, IS_SLOTS);
/* Shared with agent.bpf.c (the loader pins the agent's maps before compiling this). */
BPF_TABLE_PINNED("hash", __u32, __u64, inject_ids, 16384, PIN_INJECT_IDS);
BPF_TABLE_PINNED("lru_hash", __u32, __u64, active_server, SOCK_MAX, PIN_ACTIVE_SERVER);

static __always_inline void istat(int slot)
{
    __u64 *v = inject_stats.lookup(&slot);
    if (v)
        *v += 1;
}

/* --- sock_ops: pick the connections of selected processes ----------------------------------- */

int inject_sockops(struct bpf_sock_ops *skops)
{
    __u32 family = skops->family;
    if (family != AF_INET_ && family != AF_INET6_)
        return 1;
    __u32 op = skops->op;
    if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
        /* connect(2) runs this in the connecting process: remember the socket if selected. */
        __u32 tgid = bpf_get_current_pid_tgid() >> 32;
        if (!procs_inject.lookup(&tgid))
            return 1;
        __u64 cookie = bpf_get_socket_cookie(skops);
        __u8 one = 1;
        inject_pending.update(&cookie, &one);
    } else if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
        /* Runs in softirq (the SYN-ACK): the process is whoever was interrupted. */
        __u64 cookie = bpf_get_socket_cookie(skops);
        if (!inject_pending.lookup(&cookie))
            return 1;
        inject_pending.delete(&cookie);
        struct tuple_key tk = {};
        TUPLE_OF(skops, tk);
        struct conn_state cs = {};
        inject_conns.update(&tk, &cs);
        long err = inject_socks.sock_hash_update(skops, &cookie, BPF_NOEXIST);
        if (err == 0)
            istat(IS_SOCKETS);
    }
    return 1;
}

/* --- ids: kernel_side/assembly.py IdSource ------------------------------------------------- */

static __always_inline __u64 mix64(__u64 x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

static __always_inline void hex64(char *out, __u64 v)
{
#pragma unroll
    for (int i = 0; i < 16; i++) {
        __u8 d = (v >> (60 - 4 * i)) & 0xf;
        out[i] = d < 10 ? '0' + d : 'a' + d - 10;
    }
}

/* --- sk_msg: the injection ------------------------------------------------------------------- */

static __always_inline __u8 lower(__u8 c)
{
    return (c >= 'A' && c <= 'Z') ? c + 32 : c;
}

/* Big-endian packing of up to 8 characters, as the scanner's windows hold them. */
#define W2(a, b) (((__u64)(a) << 8) | (b))
#define W4(a, b, c, d) ((W2(a, b) << 16) | W2(c, d))
#define W8(a, b, c, d, e, f, g, h) ((W4(a, b, c, d) << 32) | W4(e, f, g, h))

/* "\ncontent-length:" / "-encoding:" / "eparent:" + "\ntrac" / "\nupgrade:" */
#define K_CONTENT W8('\n', 'c', 'o', 'n', 't', 'e', 'n', 't')
#define K_LENGTH W8('-', 'l', 'e', 'n', 'g', 't', 'h', ':')
#define K_TRAC (W4('\n', 't', 'r', 'a') << 8 | 'c')
#define K_EPARENT W8('e', 'p', 'a', 'r', 'e', 'n', 't', ':')
#define K_ENCODING W8('n', 'c', 'o', 'd', 'i', 'n', 'g', ':')
#define K_TRANSFER_E (W8('t', 'r', 'a', 'n', 's', 'f', 'e', 'r') << 0)
#define K_UPGRADE W8('u', 'p', 'g', 'r', 'a', 'd', 'e', ':')

#define K_V11 W8('T', 'P', '/', '1', '.', '1', '\r', '\n')
#define K_V10 W8('T', 'P', '/', '1', '.', '0', '\r', '\n')

/* Scan state. Only the loop index feeds pointer arithmetic: a position kept here (say, the
 * request line's end) would be tracked precisely by the verifier and multiply its states. */
/* A copy of the loop index keeps its verifier id: when the index is marked precise, so would be
 * the copy, and every position would be a state of its own. An opaque AND clears the id. */
static __always_inline __u32 opaque_pos(__u32 v)
{
    __u64 x = v;
    asm volatile("%0 &= 0xffff" : "+r"(x));
    return (__u32)x;
}

struct head_buf {
    __u8 b[HEAD_CAP];
};
BPF_PERCPU_ARRAY(inject_scratch, struct head_buf, 1);
BPF_PROG_ARRAY(inject_progs, 1);

struct scan {
    __u32 line_end;   /* index of the request line's '\n' (0: not found) */
    __u32 head_end;   /* index just past "\r\n\r\n" (0: not found) */
    __u64 clen;
    __u8 line_ok;
    __u8 has_tp;
    __u8 has_te;
    __u8 upgrade;
    __u8 cl_state;    /* 0 none, 1 in value, 2 done, 3 bad */
    __u8 bad;
};
BPF_PERCPU_ARRAY(inject_scan, struct scan, 1);

int inject_msg(struct sk_msg_md *msg)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u32 tgid = id >> 32;
    __u32 tid = (__u32)id;
    if (!procs_inject.lookup(&tgid))
        return SK_PASS;
    /* A choice left from an earlier send of this thread (a request the agent folded into a
     * running exchange) must never name this one. */
    inject_ids.delete(&tid);
    struct tuple_key tk = {};
    TUPLE_OF(msg, tk);
    struct conn_state *cs = inject_conns.lookup(&tk);
    if (!cs)
        return SK_PASS;
    __u32 size = msg->size;
    if (cs->mode == M_LOST)
        return SK_PASS;
    if (cs->mode == M_BODY) {
        if (size < cs->body_left) {
            cs->body_left -= size;
            istat(IS_BODY);
            return SK_PASS;
        }
        if (size > cs->body_left) {
            /* The next request starts inside this message: not at a place we inject. */
            cs->mode = M_LOST;
            istat(IS_LOST);
            return SK_PASS;
        }
        cs->body_left = 0;
        cs->mode = M_BOUNDARY;
        istat(IS_BODY);
        return SK_PASS;
    }

    __u32 n = size < HEAD_CAP ? size : HEAD_CAP;
    if (n < 16) {
        cs->mode = M_LOST;
        istat(IS_NOT_HTTP);
        return SK_PASS;
    }
    if (bpf_msg_pull_data(msg, 0, n, 0)) {
        istat(IS_FAILED);
        cs->mode = M_LOST;
        return SK_PASS;
    }
    __u8 *data = msg->data;
    __u8 *end = msg->data_end;
    if (data + 8 > end)
        return SK_PASS;
    /* Method: 3 to 7 uppercase letters and a space (TLS records and the HTTP/2 preface's
     * version fail the checks below). */
    int sp = 0;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        __u8 c = data[i];
        if (!sp && c == ' ' && i >= 3)
            sp = i;
        else if (!sp && (c < 'A' || c > 'Z'))
            break;
    }
    if (!sp || (data[0] == 'C' && data[1] == 'O' && data[2] == 'N')) { /* no CONNECT tunnels */
        cs->mode = M_LOST;
        istat(IS_NOT_HTTP);
        return SK_PASS;
    }

    /* Scan a copy: a map value's bounds are fixed, a packet's grow with every check. */
    int zero = 0;
    struct head_buf *hb = inject_scratch.lookup(&zero);
    if (!hb)
        return SK_PASS;
    __u32 m = n;
    if (m > HEAD_CAP)
        m = HEAD_CAP;
    if (bpf_probe_read_kernel(hb->b, m, data))
        return SK_PASS;
    /* Verifier economy: the windows are computed from the byte before any branch on it, and
     * compared through temporaries, so no branch narrows (and splits the states of) them. */
    struct scan s = {};
    __u64 w1 = 0, w2 = 0, r1 = 0, r2 = 0;
    __u32 nd = 0;
    for (__u32 i = 0; i < HEAD_CAP; i++) {
        if (i >= m)
            break;
        __u8 c = hb->b[i & (HEAD_CAP - 1)];
        r2 = (r2 << 8) | (r1 >> 56);
        r1 = (r1 << 8) | c;
        w2 = (w2 << 8) | (w1 >> 56);
        w1 = (w1 << 8) | (c | 0x20); /* letters lowered; '-' and ':' keep their value */
        __u64 t = (r1 ^ W4('\r', '\n', '\r', '\n')) & 0xffffffff;
        if (t == 0) {
            s.head_end = opaque_pos(i + 1);
            break;
        }
        t = (w1 ^ K_LENGTH) | (w2 ^ (K_CONTENT | 0x20ULL << 56)) | (((r2 >> 56) ^ '\n'));
        if (t == 0)
            s.cl_state = s.cl_state ? 3 : 1; /* a repeated Content-Length: hands off */
        t = (w1 ^ K_EPARENT) | ((w2 ^ (K_TRAC | 0x20ULL << 32)) & 0xffffffffffULL) |
            (((r2 >> 32) & 0xff) ^ '\n');
        if (t == 0)
            s.has_tp = 1;
        t = (w1 ^ K_ENCODING) | ((w2 ^ W2('-', 'e')) & 0xffff);
        if (t == 0)
            s.has_te = 1; /* Transfer-Encoding (or any *-encoding header): be careful */
        t = (w1 ^ K_UPGRADE) | ((r2 & 0xff) ^ '\n');
        if (t == 0)
            s.upgrade = 1;
        if (!s.line_end) {
            if (c == '\n') {
                s.line_end = opaque_pos(i);
                /* The request line ends in " HTTP/1.1\r\n" (or 1.0). */
                __u64 v11 = r1 ^ K_V11, v10 = r1 ^ K_V10;
                __u64 hs = (r2 & 0xffffff) ^ ((' ' << 16) | ('H' << 8) | 'T');
                if (hs || (v11 && v10))
                    break;
                s.line_ok = 1;
            } else if ((c < 0x20 && c != '\r') || c == 0x7f) {
                s.bad = 1;
                break;
            }
        }
        if (s.cl_state == 1) {
            if (c >= '0' && c <= '9') {
                s.clen = s.clen * 10 + (c - '0');
                if (++nd > 12)
                    s.cl_state = 3;
            } else if (c == '\r' || c == '\n') {
                s.cl_state = 2;
            } else if (c != ' ' && c != '\t') {
                s.cl_state = 3;
            }
        }
    }
    /* The rest runs as a tail call: verified once, not once per way out of the loop. */
    struct scan *out = inject_scan.lookup(&zero);
    if (!out)
        return SK_PASS;
    *out = s;
    inject_progs.call(msg, 0);
    return SK_PASS;
}

int inject_msg_write(struct sk_msg_md *msg)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u32 tid = (__u32)id;
    int zero = 0;
    struct scan *sp = inject_scan.lookup(&zero);
    if (!sp)
        return SK_PASS;
    struct scan s = *sp;
    struct tuple_key tk = {};
    TUPLE_OF(msg, tk);
    struct conn_state *cs = inject_conns.lookup(&tk);
    if (!cs)
        return SK_PASS;
    __u32 size = msg->size;
    if (s.bad || !s.line_ok || s.line_end < 14) {
        cs->mode = M_LOST;
        istat(IS_NOT_HTTP);
        return SK_PASS;
    }
    if (!s.head_end) {
        /* Head longer than this message (or than HEAD_CAP): the rest is unseen. */
        cs->mode = M_LOST;
        istat(IS_INCOMPLETE);
        return SK_PASS;
    }
    /* Where the next request starts. */
    if (s.has_te || s.upgrade || s.cl_state == 3 || s.cl_state == 1) {
        cs->mode = M_LOST;
    } else {
        __u64 in_msg = size - s.head_end;
        __u64 body = s.cl_state == 2 ? s.clen : 0;
        if (in_msg < body) {
            cs->mode = M_BODY;
            cs->body_left = body - in_msg;
        } else if (in_msg == body) {
            cs->mode = M_BOUNDARY;
        } else {
            cs->mode = M_LOST; /* several requests in one message: only the first is seen */
        }
    }
    if (s.has_tp) {
        istat(IS_PRESENT);
        return SK_PASS;
    }
    /* (A request pipelined behind one whose response has not begun is folded by the agent
     * into the running exchange; sk_msg cannot read bytes_received here: bpf_tcp_sock is not
     * an sk_msg helper. Not handled yet.) */
    __u64 *parent = active_server.lookup(&tid);
    if (parent && *parent) {
        /* The thread serves a request whose trace this program cannot know (it may have been
         * adopted from the caller's traceparent or stitched): leave the request alone. */
        istat(IS_NESTED);
        return SK_PASS;
    }
    struct inject_cfg *cfg = inject_cfg.lookup(&zero);
    __u64 *ctr = inject_counter.lookup(&zero);
    if (!cfg || !ctr || !cfg->s1)
        return SK_PASS;
    __u64 eid = ID_BASE + __sync_fetch_and_add(ctr, 1) + 1;
    __u64 key = eid << 16;
    __u64 span = mix64(cfg->s1 ^ key);
    if (!span)
        span = 1;
    __u64 hi = mix64(cfg->s2 ^ key);
    __u64 lo = mix64(cfg->s3 ^ key);
    if (!lo)
        lo = 1;

    __u32 at = s.line_end + 1;
    if (bpf_msg_push_data(msg, at, TP_LEN, 0)) {
        istat(IS_FAILED);
        return SK_PASS;
    }
    if (bpf_msg_pull_data(msg, at, at + TP_LEN, 0)) {
        /* The pushed bytes cannot be written: take them out again. */
        bpf_msg_pop_data(msg, at, TP_LEN, 0);
        istat(IS_FAILED);
        return SK_PASS;
    }
    char *o = msg->data;
    if ((void *)(o + TP_LEN) > msg->data_end) {
        bpf_msg_pop_data(msg, at, TP_LEN, 0);
        istat(IS_FAILED);
        return SK_PASS;
    }
    __builtin_memcpy(o, "traceparent: 00-", 16);
    hex64(o + 16, hi);
    hex64(o + 32, lo);
    o[48] = '-';
    hex64(o + 49, span);
    o[65] = '-';
    o[66] = '0';
    o[67] = '1';
    o[68] = '\r';
    o[69] = '\n';
    cs->injected = 1;
    inject_ids.update(&tid, &eid);
    istat(IS_INJECTED);
    return SK_PASS;
}
