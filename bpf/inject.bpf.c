/* ebpf-bridge traceparent injector (opt-in: inject_traceparent / --inject-traceparent).
 *
 * Appended to agent.bpf.c by the loader (with -DINJECT_TRACEPARENT) when injection is on, so it
 * reads the agent's own state (procs, socks, conns, active_io, active_server) instead
 * of keeping a second copy of it.
 *
 * - inject_sockops (sock_ops, cgroup v2 root): a TCP connect(2) by a traced process marks the
 *   socket; once the handshake completes the socket goes into the inject_socks sockhash.
 * - inject_msg (sk_msg verdict on inject_socks) runs inside the sending process's write/sendmsg.
 *   It injects only when the agent's own state machine says this write starts a new client
 *   request on a plaintext connection it traces, the message begins with a complete, well-formed
 *   HTTP/1.1 request head (request line, headers, blank line) and that head has no traceparent.
 *   It then inserts "traceparent: 00-<trace>-<span>-01\r\n" right after the request line with
 *   bpf_msg_push_data. Anything else passes untouched.
 * - The ids are those the agent's user space will give the request's CLIENT span: the exchange
 *   id comes from a range the agent's counter never reaches (ID_BASE and up), handed to
 *   start_exchange through inject_ids (keyed by thread); span id and, for a trace this request
 *   starts, trace id are derived with the per-run salt exactly as kernel_side/assembly.py's
 *   IdSource derives them. A request made while the thread serves an inbound request carries
 *   that request's trace: the trace id of its traceparent (read from the exchange the agent
 *   captured, the same bytes user space parses), or the one derived from the server exchange.
 *   When that trace is only known after same-node stitching (the caller is a traced client on
 *   this node and sent no traceparent), nothing is injected.
 *
 * Verifier economy: the head scans are branch-free per byte (flags are accumulated with
 * arithmetic, never decided by a branch), so one verifier state walks each iteration; every
 * loop is followed only by a tail call, so the ways out of a loop each cost a few instructions.
 */

#define INJ_TP_LEN 70 /* "traceparent: 00-" 16 + 32 + "-" + 16 + "-01\r\n" */
#define INJ_ID_BASE (1ULL << 47)
#ifndef INJ_HEAD_CAP
#define INJ_HEAD_CAP 1024
#endif

/* stats slots; kernel_side/inject.py names them */
#define IS_INJECTED 0
#define IS_PRESENT 1    /* the request already carried a traceparent: untouched */
#define IS_NOT_HTTP 2   /* not an HTTP/1.1 request head at a request boundary */
#define IS_INCOMPLETE 3 /* the head did not end inside this message (or within INJ_HEAD_CAP) */
#define IS_UNKNOWN_TRACE 4 /* serving a request whose trace the kernel cannot know */
#define IS_MID_REQUEST 5   /* a write inside a request (body, pipelining): not a boundary */
#define IS_UNTRACED 6   /* a connection the agent does not pair (TLS, HTTP/2, unknown) */
#define IS_FAILED 7     /* bpf_msg_push_data / pull_data refused */
#define IS_SOCKETS 8    /* connections put into the sockhash */
/* IS_TAKEN 9 and IS_SLOTS: agent.bpf.c (start_exchange counts the ids it takes) */

BPF_SOCKHASH(inject_socks, __u64, SOCK_MAX);
BPF_TABLE("lru_hash", __u64, __u8, inject_pending, SOCK_MAX);
BPF_ARRAY(inject_counter, __u64, 1);
BPF_ARRAY(inject_salt, struct id_salt, 1); /* set by kernel_side/inject.py at attach */
BPF_PROG_ARRAY(inject_progs, 3);
#define INJ_PROG_DECIDE 0
#define INJ_PROG_NESTED 1
#define INJ_PROG_PUSH 2

struct inj_head {
    __u8 b[INJ_HEAD_CAP * 2]; /* twice the cap: the verifier bounds the copy length by a mask */
};
BPF_PERCPU_ARRAY(inject_head, struct inj_head, 1);

/* What the scans found and what the next tail call needs; one per CPU (a tail-call chain runs
 * on one CPU without sleeping). All counters are sums of 0/1 values computed without branches. */
struct inj_scan {
    __u64 ptr;        /* the write's user buffer (names the write in inject_ids) */
    __u64 line_end;   /* index of the request line's '\n' */
    __u64 head_end;   /* index just past "\r\n\r\n"; 0: not in the copy */
    __u64 n_tp;       /* "\ntraceparent:" occurrences in the head */
    __u64 bad;        /* control characters in the request line */
    __u64 server_eid; /* server exchange the thread serves; 0: this request starts a trace */
    __u64 tp_pos;     /* server request: index just past its first "\ntraceparent:" */
    __u64 srv_n_tp;   /* server request: "\ntraceparent:" occurrences */
    struct sock_key server; /* the server exchange's connection */
    char tp[INJ_TP_LEN + 2]; /* the header line being built */
};
BPF_PERCPU_ARRAY(inject_scan, struct inj_scan, 1);

static __always_inline void istat(int slot)
{
    __u64 *v = inject_stats.lookup(&slot);
    if (v)
        *v += 1;
}

/* 1 when t == 0, else 0, computed without a branch. The asm keeps the compiler from folding the
 * arithmetic back into a comparison (BPF has no set-on-condition: that becomes a jump). */
static __always_inline __u64 inj_zero(__u64 t)
{
    __u64 u = t | (0 - t);
    asm volatile("" : "+r"(u));
    return (u >> 63) ^ 1;
}

/* --- sock_ops: the client connections of traced processes ----------------------------------- */

int inject_sockops(struct bpf_sock_ops *skops)
{
    __u32 family = skops->family;
    if (family != AF_INET_ && family != AF_INET6_)
        return 1;
    __u32 op = skops->op;
    if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
        /* connect(2) runs this in the connecting process. */
        __u32 tgid = bpf_get_current_pid_tgid() >> 32;
        if (!procs.lookup(&tgid))
            return 1;
        __u64 cookie = bpf_get_socket_cookie(skops);
        __u8 one = 1;
        inject_pending.update(&cookie, &one);
    } else if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
        /* Runs in softirq (the SYN-ACK): the current process is whoever was interrupted; a
         * sockhash takes only established sockets, hence the two steps. */
        __u64 cookie = bpf_get_socket_cookie(skops);
        if (!inject_pending.lookup(&cookie))
            return 1;
        inject_pending.delete(&cookie);
        long err = inject_socks.sock_hash_update(skops, &cookie, BPF_NOEXIST);
        if (err == 0)
            istat(IS_SOCKETS);
    }
    return 1;
}

/* --- ids: kernel_side/assembly.py IdSource ------------------------------------------------- */

static __always_inline __u64 inj_mix64(__u64 x)
{
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

static __always_inline void inj_hex64(char *out, __u64 v)
{
#pragma unroll
    for (int i = 0; i < 16; i++) {
        __u8 d = (v >> (60 - 4 * i)) & 0xf;
        out[i] = d < 10 ? '0' + d : 'a' + d - 10;
    }
}

/* Big-endian packing of characters, as the scanners' sliding windows hold them. */
#define W2(a, b) (((__u64)(a) << 8) | (b))
#define W4(a, b, c, d) ((W2(a, b) << 16) | W2(c, d))
#define W8(a, b, c, d, e, f, g, h) ((W4(a, b, c, d) << 32) | W4(e, f, g, h))
/* "\ntrac" + "eparent:", letters lowered with | 0x20 ('\n' | 0x20 is '*', ':' keeps its value) */
#define K_EPARENT W8('e', 'p', 'a', 'r', 'e', 'n', 't', ':')
#define K_NTRAC (W4('\n' | 0x20, 't', 'r', 'a') << 8 | 'c')
#define K_V11 W8('T', 'P', '/', '1', '.', '1', '\r', '\n')

/* --- sk_msg: the injection ------------------------------------------------------------------- */

int inject_msg(struct sk_msg_md *msg)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u32 tgid = id >> 32;
    __u32 tid = (__u32)id;
    /* A write larger than the socket's send buffer reaches this program in several messages:
     * only its first one can start a request. inject_ids holds this write's decision until the
     * agent's sys_exit takes it (0: decided, nothing injected). */
    struct io_args *a = active_io.lookup(&tid); /* as the agent's sys_enter recorded it */
    if (!a)
        return SK_PASS;
    __u64 ptr = a->ptr;
    struct inj_choice *prev = inject_ids.lookup(&tid);
    if (prev && prev->ptr == ptr)
        return SK_PASS;
    struct inj_choice none = {.eid = 0, .ptr = ptr};
    inject_ids.update(&tid, &none);
    struct sock_key k = {.tgid = tgid, .fd = a->fd};
    struct sock_info *si = socks.lookup(&k);
    if (!si || si->tls || si->mode == MODE_STREAM || si->role != ROLE_CLIENT) {
        istat(IS_UNTRACED);
        return SK_PASS;
    }
    struct exchange *st = conns.lookup(&k);
    if (st && st->phase == PHASE_REQ) {
        istat(IS_MID_REQUEST);
        return SK_PASS;
    }
    if (st && st->phase == PHASE_RESP && interim_only(st)) {
        /* the body after "100 Continue" */
        istat(IS_MID_REQUEST);
        return SK_PASS;
    }
    __u32 size = msg->size;
    __u32 n = size < INJ_HEAD_CAP ? size : INJ_HEAD_CAP;
    if (n < 18) {
        istat(IS_NOT_HTTP);
        return SK_PASS;
    }
    if (bpf_msg_pull_data(msg, 0, n, 0)) {
        istat(IS_FAILED);
        return SK_PASS;
    }
    __u8 *data = msg->data;
    __u8 *end = msg->data_end;
    if (data + 8 > end)
        return SK_PASS;
    /* Method: 3 to 7 uppercase letters and a space. TLS records and the HTTP/2 preface fail
     * here or at the version check; CONNECT opens a tunnel whose bytes are not ours. */
    int sp = 0;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        __u8 c = data[i];
        if (!sp && c == ' ' && i >= 3)
            sp = i;
        else if (!sp && (c < 'A' || c > 'Z'))
            break;
    }
    if (!sp || (data[0] == 'C' && data[1] == 'O' && data[2] == 'N')) {
        istat(IS_NOT_HTTP);
        return SK_PASS;
    }
    int zero = 0;
    struct inj_head *hb = inject_head.lookup(&zero);
    struct inj_scan *sc = inject_scan.lookup(&zero);
    if (!hb || !sc)
        return SK_PASS;
    __u32 m = (__u32)(end - data);
    if (m > n)
        m = n;
    if (m > INJ_HEAD_CAP)
        m = INJ_HEAD_CAP;
    if (m < 18)
        return SK_PASS;
    __u64 mlen = m;
    /* opaque to the compiler, which would drop a mask it can prove redundant */
    asm volatile("%0 &= %1" : "+r"(mlen) : "i"(INJ_HEAD_CAP * 2 - 1));
    if (bpf_probe_read_kernel(hb->b, mlen, data))
        return SK_PASS;
    __builtin_memset(sc, 0, sizeof(*sc));
    sc->ptr = ptr;
    /* Sliding windows of the last 16 bytes: r raw, w with letters lowered. */
    __u64 r1 = 0, r2 = 0, w1 = 0, w2 = 0;
    __u64 seen_nl = 0;
#pragma clang loop unroll(disable)
    for (__u32 i = 0; i < INJ_HEAD_CAP; i++) {
        if (i >= m)
            break;
        __u64 c = hb->b[i & (INJ_HEAD_CAP - 1)];
        r2 = (r2 << 8) | (r1 >> 56);
        r1 = (r1 << 8) | c;
        w2 = (w2 << 8) | (w1 >> 56);
        w1 = (w1 << 8) | (c | 0x20);
        __u64 in_line = seen_nl ^ 1;
        __u64 nl = inj_zero(c ^ '\n');
        /* the request line's '\n' (only the first: in_line is 0 afterwards) */
        sc->line_end += in_line * nl * i;
        /* control characters other than CR, and DEL, inside the request line */
        __u64 ctl = (((c - 0x20) >> 63) & (inj_zero(c ^ '\r') ^ 1)) | inj_zero(c ^ 0x7f);
        sc->bad += in_line * (ctl & (nl ^ 1));
        seen_nl |= nl;
        sc->n_tp += inj_zero((w1 ^ K_EPARENT) | ((w2 ^ K_NTRAC) & 0xffffffffffULL));
        if (((r1 ^ W4('\r', '\n', '\r', '\n')) & 0xffffffff) == 0) {
            sc->head_end = i + 1;
            break;
        }
    }
    inject_progs.call(msg, INJ_PROG_DECIDE);
    return SK_PASS;
}

int inject_decide(struct sk_msg_md *msg)
{
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    int zero = 0;
    struct inj_head *hb = inject_head.lookup(&zero);
    struct inj_scan *sc = inject_scan.lookup(&zero);
    if (!hb || !sc)
        return SK_PASS;
    __u64 le = sc->line_end;
    /* The request line: "<METHOD> <target> HTTP/1.1\r\n", at least "GET / HTTP/1.1\r\n". */
    if (sc->bad || le < 15 || le >= INJ_HEAD_CAP) {
        istat(IS_NOT_HTTP);
        return SK_PASS;
    }
    /* " HTTP/1.1\r\n" ends the line: b[le-10] is the space, b[le-7..le] "TP/1.1\r\n". */
    __u64 v = 0;
#pragma unroll
    for (int j = 0; j < 8; j++)
        v = (v << 8) | hb->b[(le - 7 + j) & (INJ_HEAD_CAP - 1)];
    if (hb->b[(le - 10) & (INJ_HEAD_CAP - 1)] != ' ' || hb->b[(le - 9) & (INJ_HEAD_CAP - 1)] != 'H' ||
        hb->b[(le - 8) & (INJ_HEAD_CAP - 1)] != 'T' || v != K_V11) {
        istat(IS_NOT_HTTP);
        return SK_PASS;
    }
    if (!sc->head_end) {
        istat(IS_INCOMPLETE);
        return SK_PASS;
    }
    if (sc->n_tp) {
        istat(IS_PRESENT);
        return SK_PASS;
    }
    __u64 *srv = active_server.lookup(&tid);
    if (!srv || !*srv) {
        sc->server_eid = 0;
        inject_progs.call(msg, INJ_PROG_PUSH);
        return SK_PASS;
    }
    /* The thread serves an inbound request: find the exchange the agent keeps for it. */
    struct sock_key *sk = server_conn_by_tid.lookup(&tid);
    if (!sk) {
        istat(IS_UNKNOWN_TRACE);
        return SK_PASS;
    }
    sc->server = *sk;
    sc->server_eid = *srv;
    inject_progs.call(msg, INJ_PROG_NESTED);
    return SK_PASS;
}

/* The inbound request the thread serves: where its traceparent is, as user space will read it
 * from the same captured bytes. */
int inject_nested(struct sk_msg_md *msg)
{
    int zero = 0;
    struct inj_scan *sc = inject_scan.lookup(&zero);
    if (!sc)
        return SK_PASS;
    struct sock_key k = sc->server;
    struct exchange *st = conns.lookup(&k);
    if (!st || st->role != ROLE_SERVER || st->exchange_id != sc->server_eid ||
        st->phase == PHASE_IDLE) {
        istat(IS_UNKNOWN_TRACE);
        return SK_PASS;
    }
    __u32 m = st->req_cap;
    if (m > REQ_CAP)
        m = REQ_CAP;
    __u64 w1 = 0, w2 = 0, r1 = 0;
    sc->tp_pos = 0;
    sc->srv_n_tp = 0;
#pragma clang loop unroll(disable)
    for (__u32 i = 0; i < REQ_CAP; i++) {
        if (i >= m)
            break;
        __u64 c = st->req[i & (REQ_CAP - 1)];
        r1 = (r1 << 8) | c;
        w2 = (w2 << 8) | (w1 >> 56);
        w1 = (w1 << 8) | (c | 0x20);
        __u64 hit = inj_zero((w1 ^ K_EPARENT) | ((w2 ^ K_NTRAC) & 0xffffffffffULL));
        sc->tp_pos += hit * inj_zero(sc->srv_n_tp) * (i + 1);
        sc->srv_n_tp += hit;
        if (((r1 ^ W4('\r', '\n', '\r', '\n')) & 0xffffffff) == 0)
            break;
    }
    inject_progs.call(msg, INJ_PROG_PUSH);
    return SK_PASS;
}

/* 1 when c is a lowercase hex digit, without a branch (two's complement range checks). */
static __always_inline __u64 inj_hexdigit(__u64 c)
{
    __u64 d = c - '0', e = c - 'a';
    return ((((d | (9 - d)) >> 63) ^ 1) | (((e | (5 - e)) >> 63) ^ 1)) & 1;
}

int inject_push(struct sk_msg_md *msg)
{
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    int zero = 0;
    struct inj_scan *sc = inject_scan.lookup(&zero);
    /* This agent's own salt, not the pinned id_salt map: another agent started with the same
     * pin directory would overwrite that one, and the ids on the wire would stop matching the
     * spans this agent exports. */
    struct id_salt *salt = inject_salt.lookup(&zero);
    __u64 *ctr = inject_counter.lookup(&zero);
    if (!sc || !salt || !ctr)
        return SK_PASS;
    __u64 s1, s2, s3;
    __builtin_memcpy(&s1, &salt->bytes[0], 8);
    __builtin_memcpy(&s2, &salt->bytes[8], 8);
    __builtin_memcpy(&s3, &salt->bytes[16], 8);
    if (!(s1 | s2 | s3))
        return SK_PASS; /* the agent has not published its salt yet */

    char *tp = sc->tp;
    __builtin_memcpy(tp, "traceparent: 00-", 16);
    __u64 seid = sc->server_eid;
    if (seid) {
        struct sock_key k = sc->server;
        struct exchange *st = conns.lookup(&k);
        if (!st || st->exchange_id != seid) {
            istat(IS_UNKNOWN_TRACE);
            return SK_PASS;
        }
        if (sc->srv_n_tp == 1) {
            /* Adopt the inbound trace id when user space will: "00-" + 32 lowercase hex + "-"
             * + 16 lowercase hex + "-" + 2 hex, neither id all zeros (any other value: user
             * space's decision is not worth replaying here; nothing is injected). */
            __u32 p = sc->tp_pos;
#pragma unroll
            for (int j = 0; j < 2; j++)
                if (st->req[p & (REQ_CAP * 2 - 1)] == ' ' || st->req[p & (REQ_CAP * 2 - 1)] == '\t')
                    p++;
            if (p + 56 > st->req_cap || p + 56 > REQ_CAP) {
                istat(IS_UNKNOWN_TRACE);
                return SK_PASS;
            }
            __u8 *v = &st->req[p & (REQ_CAP - 1)];
            __u64 ok = inj_zero((v[0] ^ '0') | (v[1] ^ '0') | (v[2] ^ '-') | (v[35] ^ '-') |
                                (v[52] ^ '-'));
            __u64 tnz = 0, snz = 0;
#pragma clang loop unroll(disable)
            for (int j = 0; j < 32; j++) {
                __u64 c = v[3 + j];
                ok &= inj_hexdigit(c);
                tnz |= c ^ '0';
            }
#pragma clang loop unroll(disable)
            for (int j = 0; j < 16; j++) {
                __u64 c = v[36 + j];
                ok &= inj_hexdigit(c);
                snz |= c ^ '0';
            }
            ok &= inj_hexdigit(v[53]) & inj_hexdigit(v[54]);
            ok &= inj_zero(v[55] ^ '\r') | inj_zero(v[55] ^ ' ') | inj_zero(v[55] ^ '\t');
            if (!ok || !tnz || !snz) {
                istat(IS_UNKNOWN_TRACE);
                return SK_PASS;
            }
            __builtin_memcpy(&tp[16], &v[3], 32);
        } else {
            /* No (single) traceparent: the server span's trace is its own, unless user space
             * will stitch it to a traced client on this node. */
            struct addr_port ap;
            addr_key(&ap, st->peer_addr, st->peer_port);
            if (client_by_port.lookup(&ap)) {
                istat(IS_UNKNOWN_TRACE);
                return SK_PASS;
            }
            __u64 key = seid << 16;
            __u64 lo = inj_mix64(s3 ^ key);
            inj_hex64(&tp[16], inj_mix64(s2 ^ key));
            inj_hex64(&tp[32], lo ? lo : 1);
        }
    }
    __u64 eid = INJ_ID_BASE + __sync_fetch_and_add(ctr, 1) + 1;
    __u64 key = eid << 16;
    if (!seid) {
        __u64 lo = inj_mix64(s3 ^ key);
        inj_hex64(&tp[16], inj_mix64(s2 ^ key));
        inj_hex64(&tp[32], lo ? lo : 1);
    }
    __u64 span = inj_mix64(s1 ^ key);
    tp[48] = '-';
    inj_hex64(&tp[49], span ? span : 1);
    tp[65] = '-';
    tp[66] = '0';
    tp[67] = '1';
    tp[68] = '\r';
    tp[69] = '\n';

    __u32 at = sc->line_end + 1;
    if (bpf_msg_push_data(msg, at, INJ_TP_LEN, 0)) {
        istat(IS_FAILED);
        return SK_PASS;
    }
    if (bpf_msg_pull_data(msg, at, at + INJ_TP_LEN, 0)) {
        bpf_msg_pop_data(msg, at, INJ_TP_LEN, 0);
        istat(IS_FAILED);
        return SK_PASS;
    }
    char *o = msg->data;
    if ((void *)(o + INJ_TP_LEN) > msg->data_end) {
        bpf_msg_pop_data(msg, at, INJ_TP_LEN, 0);
        istat(IS_FAILED);
        return SK_PASS;
    }
    __builtin_memcpy(o, tp, INJ_TP_LEN);
    struct inj_choice ch = {.eid = eid, .ptr = sc->ptr};
    inject_ids.update(&tid, &ch);
    istat(IS_INJECTED);
    return SK_PASS;
}
