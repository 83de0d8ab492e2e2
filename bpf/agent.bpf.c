/* ebpf-bridge agent: syscall tracepoints that pair each request with its response in the
 * kernel and emit ONE ring-buffer event per finished exchange, carrying the business context
 * the application wrote into ctx_by_tid.
 *
 * Compiled by BCC at agent start. The loader defines REQ_CAP, RESP_CAP, CONN_MAX, SOCK_MAX,
 * RINGBUF_PAGES and PIN_CTX_BY_TID with -D, and adds this directory to the include path.
 *
 * Only syscall tracepoints and sched/task tracepoints: this kernel has no kprobes, and the
 * kernel headers available are not this kernel's, so nothing here walks kernel structs.
 */
#include <uapi/linux/ptrace.h>
/* Not <linux/sched.h>: nothing here reads task_struct, and that header costs 0.3 s of the
 * agent's start. CLONE_THREAD is uapi (include/uapi/linux/sched.h), stable forever. */
#ifndef CLONE_THREAD
#define CLONE_THREAD 0x00010000
#endif
#include "bridge_abi.h"

#define EV_EXCHANGE 1
#define EV_PROC 2
#define EV_CHUNK 3
#define EV_EXCHANGE_PACKED 4

/* sock_info.mode */
#define MODE_UNKNOWN 0   /* no request bytes seen yet */
#define MODE_EXCHANGE 1  /* request/response protocols: paired in the kernel */
#define MODE_STREAM 2    /* multiplexed protocols (HTTP/2): every read/write is a chunk */

#define CHUNK_F_CLOSE 1

#ifndef CHUNK_CAP
#define CHUNK_CAP 4096
#endif

#define ROLE_SERVER 1
#define ROLE_CLIENT 2

#define PHASE_IDLE 0
#define PHASE_REQ 1
#define PHASE_RESP 2
/* Only in an emitted exchange: the connection closed, so user space drops its per-connection
 * state (HTTP request ordinal, database name, prepared statements) with it. */
#define PHASE_CLOSED 3

#define DIR_IN 0
#define DIR_OUT 1

#define IO_BUF 0
#define IO_IOVEC 1

#define PROC_EXEC 1
#define PROC_FORK 2
#define PROC_EXIT 3

#define AF_INET_ 2
#define AF_INET6_ 10
#define EINPROGRESS_ 115
#define MAX_IOV 4
/* HTTP/2 stacks gather many small slices into one sendmsg (frame header, HPACK block, data):
 * a header block left out of the capture would cost the connection its HPACK state. */
#define STREAM_MAX_IOV 64

/* stats slots; kernel_side/bpf_layout.py names them */
#define ST_LOST 0
#define ST_EXCHANGES 1
#define ST_UNMATCHED_RESPONSE 2
#define ST_CTX_HITS 3
#define ST_NS_ERRORS 4
#define ST_CONN_CREATED 5
#define ST_PROC_LOST 6
#define ST_CHUNKS 7
/* Entries this program removed from `conns` / added to and removed from `socks`: user space
 * subtracts them, and its own deletes and the live count, from the creations to tell LRU
 * evictions (state lost under pressure) from ordinary ends. */
#define ST_CONN_DELETED 8
#define ST_SOCK_CREATED 9
#define ST_SOCK_DELETED 10
/* A bookkeeping map (syscalls in progress, traced processes) was full: that syscall or that
 * process is not traced. */
#define ST_TRACK_FULL 11
#define ST_SLOTS 12

struct proc_info {
    __u64 ns_dev;
    __u64 ns_ino;
};

struct sock_key {
    __u32 tgid;
    __u32 fd;
};

struct sock_info {
    __u64 conn_id;
    __u8 role;
    __u8 family;
    __u16 peer_port;
    __u32 listen_fd;
    __u8 peer_addr[16];
    __u8 mode;
    __u8 local_known;
    __u16 local_port;
    __u32 _pad;
    __u8 local_addr[16];
    __u8 tls;        /* TLS connection: socket bytes are ciphertext, the SSL uprobes feed it */
    __u8 tls_checks; /* request-direction I/Os looked at for a TLS record head so far */
};

/* A TCP socket's own address, read from the kernel's socket (which the syscall tracepoints
 * never see) by sock:sock_send_length/sock_recv_length, which fire inside the syscall and so
 * tie it to the (tgid, fd) in flight. */
struct sk_tuple {
    __u8 saddr[16];
    __u16 sport;
    __u16 family;
    __u16 dport;
    __u16 _pad;
    __u8 daddr[16]; /* the peer: servers that accept with a NULL sockaddr (libuv) learn it here */
};

/* An endpoint (address, port) of a traced client socket on this node. */
struct addr_port {
    __u8 addr[16];
    __u16 port;
    __u16 _pad0;
    __u32 _pad1;
};

/* One read or write on a stream-mode connection, in order. HTTP/2 multiplexes streams in both
 * directions at once, so pairing in the kernel is impossible: user space reassembles frames and
 * keeps the HPACK tables. */
struct chunk {
    __u32 type;
    __u32 tgid;
    __u32 fd;
    __u8 role;
    __u8 from_client;
    __u8 has_ctx;
    __u8 flags;
    __u16 peer_port;
    __u8 family;
    __u8 _pad0;
    __u32 listen_fd;
    __u32 tid;
    __u32 cap;
    __u64 len;
    __u64 conn_id;
    __u64 ts_ns;
    __u64 parent_exchange_id;
    __u8 peer_addr[16];
    __u8 local_addr[16];
    __u16 local_port;
    __u8 peer_traced;
    __u8 tls;
    __u8 _pad1[4];
    struct bridge_ctx_value ctx;
    __u8 data[CHUNK_CAP * 2];
};

/* Per-connection exchange state, and also the event layout: an exchange is emitted by handing
 * this very struct to the ring buffer, cut after the captured request bytes. The response area
 * comes before the request area so that cut drops only unused space. Both areas are twice the
 * capture size because the verifier bounds offset and length independently. */
struct exchange {
    __u32 type;
    __u32 tgid;
    __u32 fd;
    __u8 role;
    __u8 family;
    __u8 phase;
    __u8 has_ctx;
    __u16 peer_port;
    __u16 _pad0;
    __u32 listen_fd;
    __u32 req_tid;
    __u32 resp_tid;
    __u32 req_cap;
    __u32 resp_cap;
    __u32 req_calls;
    __u32 resp_calls;
    __u8 peer_addr[16];
    __u64 conn_id;
    __u64 exchange_id;
    __u64 parent_exchange_id;
    __u64 req_start_ns;
    __u64 req_end_ns;
    __u64 resp_start_ns;
    __u64 resp_end_ns;
    __u64 req_bytes;
    __u64 resp_bytes;
    __u8 local_addr[16];
    __u16 local_port;
    __u8 peer_traced; /* server side: the client is a traced socket on this node */
    __u8 tls;         /* the bytes are TLS plaintext from the SSL uprobes */
    __u8 _pad1[4];
    struct bridge_ctx_value ctx;
    __u8 resp[RESP_CAP * 2];
    __u8 req[REQ_CAP * 2];
};

struct proc_event {
    __u32 type;
    __u32 what;
    __u32 pid;
    __u32 ppid;
    char comm[16];
};

/* Userland ABI layouts (x86_64/arm64 LP64), declared here rather than taken from kernel
 * headers that may not match the running kernel. */
struct u_iovec {
    __u64 base;
    __u64 len;
};

struct u_msghdr {
    __u64 name;
    __u32 namelen;
    __u32 _pad;
    __u64 iov;
    __u64 iovlen;
};

struct io_args {
    __u64 ptr;
    __u32 fd;
    __u8 kind;
    __u8 dir; /* DIR_IN or DIR_OUT */
    __u8 _pad[2];
    __u64 vlen;
};

BPF_HASH(procs, __u32, struct proc_info, 16384);
BPF_TABLE("lru_hash", struct sock_key, struct sock_info, socks, SOCK_MAX);
BPF_TABLE("lru_hash", struct sock_key, struct exchange, conns, CONN_MAX);
/* Connections whose response is under way: user space flushes the idle ones (the kernel only
 * learns an exchange ended when the next request or a close comes). */
BPF_TABLE("lru_hash", struct sock_key, __u64, inflight, CONN_MAX);
BPF_TABLE("lru_hash", __u32, __u64, active_server, SOCK_MAX);
/* An accepted connection of a process, by its client port: the context an application writes
 * names the inbound connection of its request (bridge_ctx_value.server_peer_port), and the
 * client exchanges made under it are parented under that connection's server exchange. */
struct peer_key {
    __u32 tgid;
    __u16 port;
    __u16 _pad;
};
BPF_TABLE("lru_hash", struct peer_key, __u32, server_by_peer, SOCK_MAX);
/* Calls in progress, one entry per thread inside one (a thread blocked in SSL_read() holds its
 * entry): the loader sets THREAD_MAX (max_threads). The socket syscalls need no such map: their
 * exits read the arguments from the saved registers. */
#ifndef THREAD_MAX
#define THREAD_MAX 10240
#endif
#ifdef INJECT_TRACEPARENT
BPF_HASH(active_io, __u32, struct io_args, THREAD_MAX); /* the write in flight, for the injector */
#endif
BPF_PERCPU_ARRAY(zero_exchange, struct exchange, 1);
BPF_PERCPU_ARRAY(chunk_scratch, struct chunk, 1);
BPF_TABLE("lru_hash", struct addr_port, __u8, client_by_port, SOCK_MAX);
BPF_PERCPU_ARRAY(stats, __u64, ST_SLOTS);
BPF_ARRAY(id_counter, __u64, 1);
BPF_PERCPU_ARRAY(since_wakeup, __u64, 1);
/* --exe names without wildcards (comm, at most 15 bytes): a process that execs one is selected
 * in the kernel at once, so a short-lived client (curl) is traced from its first connect
 * rather than from whenever user space reads its exec event. default_ns holds the agent's pid
 * namespace for such processes until user space records their own. */
struct exec_name {
    char comm[16];
};
BPF_HASH(exec_names, struct exec_name, __u8, 256);
BPF_ARRAY(default_ns, struct proc_info, 1);
BPF_TABLE_PINNED("lru_hash", struct bridge_ctx_key, struct bridge_ctx_value, ctx_by_tid,
                 BRIDGE_CTX_MAX_ENTRIES, PIN_CTX_BY_TID);
#ifndef PIN_CTX_CELLS
#define PIN_CTX_CELLS BRIDGE_CTX_CELLS_PIN
#endif
BPF_TABLE_PINNED("array", __u32, struct bridge_ctx_cell, ctx_cells, BRIDGE_CTX_CELLS,
                 PIN_CTX_CELLS, BPF_F_MMAPABLE);
/* The loader passes the pin path; the fallback is the default pin directory. */
#ifndef PIN_CTX_BY_CONN
#define PIN_CTX_BY_CONN BRIDGE_CTX_BY_CONN_PIN
#endif
BPF_TABLE_PINNED("lru_hash", struct bridge_conn_key, struct bridge_ctx_value, ctx_by_conn,
                 BRIDGE_CTX_MAX_ENTRIES, PIN_CTX_BY_CONN);
/* The other direction, read by applications (bridge.current_span_context): the server exchange
 * each thread serves, and the salt user space derives span ids from (written at start). */
#ifndef PIN_SERVER_BY_TID
#define PIN_SERVER_BY_TID BRIDGE_PIN_DIR "/server_by_tid"
#endif
#ifndef PIN_ID_SALT
#define PIN_ID_SALT BRIDGE_PIN_DIR "/id_salt"
#endif
struct id_salt {
    __u8 bytes[24];
};
BPF_TABLE_PINNED("lru_hash", struct bridge_ctx_key, __u64, server_by_tid, BRIDGE_CTX_MAX_ENTRIES,
                 PIN_SERVER_BY_TID);
BPF_TABLE_PINNED("array", __u32, struct id_salt, id_salt, 1, PIN_ID_SALT);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);

/* User memory is read through this pointer to the helper, not by calling
 * bpf_probe_read_user() by name. For every call of that name in the source, BCC 0.26's
 * rewriter resolves a kernel symbol and re-reads all of /proc/kallsyms to do it (perf:
 * bcc_symcache_resolve_name under BTypeVisitor::VisitCallExpr), which cost about 80 ms a call
 * site on the 2-core VM: over a second of every agent start for 13 call sites. The lookup
 * decides whether BCC's helpers header maps the name to bpf_probe_read (kernels before 5.5);
 * the agent needs 5.8 for its ring buffer, so the helper is always there. The header declares
 * the helper returning int; the kernel's helper returns long, as here, which saves a sign
 * extension per call (data_exit: 4,964 -> 4,914 instructions) and nothing else changes. */
static long (*read_user)(void *dst, __u32 size, const void *src) =
    (void *)BPF_FUNC_probe_read_user;

static __always_inline void stat_inc(int slot)
{
    __u64 *v = stats.lookup(&slot);
    if (v)
        *v += 1;
}

static __always_inline __u64 next_id(void)
{
    int zero = 0;
    __u64 *c = id_counter.lookup(&zero);
    if (!c)
        return 0;
    return __sync_fetch_and_add(c, 1) + 1;
}

/* The thread as the application names it: (pid namespace inode, tid in that namespace). */
static __always_inline int ns_ctx_key(__u32 tgid, struct bridge_ctx_key *key)
{
    struct proc_info *pi = procs.lookup(&tgid);
    if (!pi)
        return -1;
    struct bpf_pidns_info ns = {};
    if (bpf_get_ns_current_pid_tgid(pi->ns_dev, pi->ns_ino, &ns, sizeof(ns))) {
        stat_inc(ST_NS_ERRORS);
        return -1;
    }
    key->pidns_ino = pi->ns_ino;
    key->tid = ns.pid;
    key->_pad = 0;
    return 0;
}

/* The connection (process as the app names it, fd) for ctx_by_conn; call from the process. */
static __always_inline int ns_conn_key(__u32 tgid, __u32 fd, struct bridge_conn_key *key)
{
    struct proc_info *pi = procs.lookup(&tgid);
    if (!pi)
        return -1;
    struct bpf_pidns_info ns = {};
    if (bpf_get_ns_current_pid_tgid(pi->ns_dev, pi->ns_ino, &ns, sizeof(ns)))
        return -1;
    key->pidns_ino = pi->ns_ino;
    key->tgid = ns.tgid;
    key->fd = fd;
    return 0;
}

/* The current thread's ctx_cells cell if it claimed one, else 0 (it uses ctx_by_tid). */
static __always_inline struct bridge_ctx_cell *own_cell(__u64 pidns_ino, __u32 tid)
{
    if (pidns_ino >> 32)
        return 0;
    __u64 owner = bridge_cell_owner(pidns_ino, tid);
    __u32 idx = bridge_cell_index(owner);
    struct bridge_ctx_cell *c = ctx_cells.lookup(&idx);
    if (c && c->owner == owner)
        return c;
    return 0;
}

/* The context for I/O on (tgid, fd) by the current thread: the connection's entry wins over
 * the thread's. */
static __always_inline struct bridge_ctx_value *lookup_ctx(__u32 tgid, __u32 fd)
{
    /* One process lookup and one namespace query serve both keys. */
    struct proc_info *pi = procs.lookup(&tgid);
    if (!pi)
        return 0;
    struct bpf_pidns_info ns = {};
    if (bpf_get_ns_current_pid_tgid(pi->ns_dev, pi->ns_ino, &ns, sizeof(ns))) {
        stat_inc(ST_NS_ERRORS);
        return 0;
    }
    struct bridge_conn_key ck = {.pidns_ino = pi->ns_ino, .tgid = ns.tgid, .fd = fd};
    struct bridge_ctx_value *cv = ctx_by_conn.lookup(&ck);
    if (cv)
        return cv;
    struct bridge_ctx_cell *cell = own_cell(pi->ns_ino, ns.pid);
    if (cell)
        return cell->live ? &cell->value : 0;
    struct bridge_ctx_key key = {.pidns_ino = pi->ns_ino, .tid = ns.pid, ._pad = 0};
    return ctx_by_tid.lookup(&key);
}

static __always_inline void snapshot_ctx(struct exchange *st, __u32 tgid, __u32 fd)
{
    st->has_ctx = 0;
    struct bridge_ctx_value *v = lookup_ctx(tgid, fd);
    if (!v)
        return;
    __builtin_memcpy(&st->ctx, v, sizeof(st->ctx));
    st->has_ctx = 1;
    stat_inc(ST_CTX_HITS);
}

/* IPv4-mapped IPv6 (::ffff:a.b.c.d) becomes plain IPv4 bytes, so a dual-stack server's view
 * of a peer and the IPv4 client's own view of itself compare equal. */
static __always_inline void addr_key(struct addr_port *out, const __u8 *addr, __u16 port)
{
    __builtin_memset(out, 0, sizeof(*out));
    int mapped = 1;
#pragma unroll
    for (int i = 0; i < 10; i++)
        if (addr[i])
            mapped = 0;
    if (mapped && addr[10] == 0xff && addr[11] == 0xff) {
        out->addr[0] = addr[12];
        out->addr[1] = addr[13];
        out->addr[2] = addr[14];
        out->addr[3] = addr[15];
    } else {
        __builtin_memcpy(out->addr, addr, 16);
    }
    out->port = port;
}

static __always_inline void mark_peer(struct exchange *st)
{
    if (st->role != ROLE_SERVER || st->peer_traced)
        return;
    struct addr_port ap;
    addr_key(&ap, st->peer_addr, st->peer_port);
    if (client_by_port.lookup(&ap))
        st->peer_traced = 1;
}

/* Waking the consumer on every event costs the traced application an inter-processor
 * interrupt per request, and costs the consumer a cold start per wake-up: measured on the
 * 2-core VM, the agent's Python work per span was 13 us in bursts of 64 events, 10 us in bursts
 * of 256 and 9 us in bursts of 512 (8 us without pauses). So the consumer drains the ring on
 * its own timer (drain_interval_s() in kernel_side/agent.py) and a CPU wakes it only after
 * writing WAKEUP_BYTES of its own since its last wake-up: an eighth of the ring shared by NCPUS
 * CPUs, so the ring is at most an eighth full when the last CPU to cross the threshold wakes
 * the consumer. The threshold counts bytes, not events, because events range from about 100
 * bytes to a few KB. (A quarter saved another 0.7 us per span at nginx max rate but held
 * 2-3 MB more of the agent's memory in each batch; at 10,000 spans/s the timer drains first
 * either way. bpf_ringbuf_query() would give the ring's fill level directly, but BCC 0.26
 * does not rewrite that helper's map argument: "R1 type=scalar expected=map_ptr".) */
#ifndef NCPUS
#define NCPUS 1
#endif
#ifndef WAKEUP_BYTES
#define WAKEUP_BYTES (RINGBUF_PAGES * 4096ULL / 8 / NCPUS)
#endif
static __always_inline __u64 wakeup_flag(__u64 size)
{
    int zero = 0;
    __u64 *n = since_wakeup.lookup(&zero);
    if (!n)
        return 0;
    *n += size;
    if (*n >= WAKEUP_BYTES) {
        *n = 0;
        return BPF_RB_FORCE_WAKEUP;
    }
    return BPF_RB_NO_WAKEUP;
}

/* The event an exchange becomes, packed: the header fields of struct exchange, then the
 * captured request bytes, the captured response bytes, and the context only when there is one
 * (EV_EXCHANGE_PACKED; kernel_side/events.py decodes it). Writing the struct as it lies in the
 * map (context and full response buffer always) put about 1.6 KB per request into the ring;
 * the ring's cache lines are cold, and that copy was about half of this program's cost. */
#define EX_HDR offsetof(struct exchange, ctx)
/* The packed event needs header + both capture buffers + context: exactly a struct exchange. */
BPF_PERCPU_ARRAY(packed_scratch, struct exchange, 1);

static __always_inline void emit(struct exchange *st)
{
    st->type = EV_EXCHANGE;
    mark_peer(st);
    int zero = 0;
    struct exchange *pe = packed_scratch.lookup(&zero);
    if (!pe)
        return;
    __u8 *b = (__u8 *)pe;
    __u32 n = st->req_cap;
    if (n > REQ_CAP)
        n = REQ_CAP;
    __u32 r = st->resp_cap;
    if (r > RESP_CAP)
        r = RESP_CAP;
    __builtin_memcpy(b, st, EX_HDR);
    pe->type = EV_EXCHANGE_PACKED;
    __u32 off = EX_HDR;
    n &= REQ_CAP * 2 - 1;
    r &= RESP_CAP * 2 - 1;
    if (n)
        bpf_probe_read_kernel(&b[EX_HDR], n, st->req);
    off += n;
    if (r)
        bpf_probe_read_kernel(&b[off], r, st->resp);
    off += r;
    if (st->has_ctx) {
        bpf_probe_read_kernel(&b[off], sizeof(struct bridge_ctx_value), &st->ctx);
        off += sizeof(struct bridge_ctx_value);
    }
    if (events.ringbuf_output(b, off, wakeup_flag(off)))
        stat_inc(ST_LOST);
    else
        stat_inc(ST_EXCHANGES);
}

/* The server exchange a client exchange of thread tid belongs to. The context's inbound
 * connection (server_peer_port) wins while its exchange is under way; otherwise the exchange
 * that last started on the thread (right for thread-per-request servers only). */
static __always_inline __u64 client_parent(__u32 tgid, __u32 tid, __u16 server_peer_port)
{
    if (server_peer_port) {
        struct peer_key pk = {.tgid = tgid, .port = server_peer_port};
        __u32 *fd = server_by_peer.lookup(&pk);
        if (fd) {
            struct sock_key sk = {.tgid = tgid, .fd = *fd};
            struct exchange *srv = conns.lookup(&sk);
            if (srv && srv->role == ROLE_SERVER && srv->phase != PHASE_IDLE)
                return srv->exchange_id;
        }
    }
    __u64 *parent = active_server.lookup(&tid);
    return parent ? *parent : 0;
}

#ifdef INJECT_TRACEPARENT
/* The injector's choice for the write a thread is in (inject.bpf.c): the exchange id whose span
 * id went on the wire (0: nothing injected), for the write whose buffer is ptr. */
struct inj_choice {
    __u64 eid;
    __u64 ptr;
};
BPF_HASH(inject_ids, __u32, struct inj_choice, THREAD_MAX);
/* The connection of the server exchange a thread last started (where active_server's exchange
 * lives), so the injector can read that request's traceparent. */
BPF_TABLE("lru_hash", __u32, struct sock_key, server_conn_by_tid, SOCK_MAX);
#define IS_TAKEN 9 /* inject.bpf.c names the other slots */
#define IS_SLOTS 10
BPF_PERCPU_ARRAY(inject_stats, __u64, IS_SLOTS);
#endif

static __always_inline void start_exchange(struct exchange *st, struct sock_key *k, __u32 tid)
{
    __u64 now = bpf_ktime_get_ns();
    st->phase = PHASE_REQ;
    st->exchange_id = next_id();
    st->parent_exchange_id = 0;
    st->req_start_ns = now;
    st->req_end_ns = now;
    st->resp_start_ns = 0;
    st->resp_end_ns = 0;
    st->req_bytes = 0;
    st->resp_bytes = 0;
    st->req_cap = 0;
    st->resp_cap = 0;
    st->req_calls = 0;
    st->resp_calls = 0;
    st->req_tid = tid;
    st->resp_tid = 0;
    st->has_ctx = 0;
    if (st->role == ROLE_SERVER) {
        /* A new inbound request on this thread: whatever context the thread held belonged to
         * an earlier request. Not so for an event-loop thread (task-scoped entries): it serves
         * many requests at once and the SDK keeps its entry in step with the running task. */
        struct bridge_ctx_key key = {};
        if (ns_ctx_key(k->tgid, &key) == 0) {
            struct bridge_ctx_cell *cell = own_cell(key.pidns_ino, key.tid);
            if (cell) {
                if (cell->live && !(cell->value.flags & BRIDGE_CTX_F_TASK_SCOPED))
                    cell->live = 0;
            } else {
                struct bridge_ctx_value *old = ctx_by_tid.lookup(&key);
                if (old && !(old->flags & BRIDGE_CTX_F_TASK_SCOPED))
                    ctx_by_tid.delete(&key);
            }
            /* A thread serves request after request: overwrite its entry in place (an update
             * of an LRU hash allocates and swaps an element every time). */
            __u64 *sv = server_by_tid.lookup(&key);
            if (sv)
                *sv = st->exchange_id;
            else
                server_by_tid.update(&key, &st->exchange_id);
        }
        __u64 *as = active_server.lookup(&tid);
        if (as)
            *as = st->exchange_id;
        else
            active_server.update(&tid, &st->exchange_id);
#ifdef INJECT_TRACEPARENT
        server_conn_by_tid.update(&tid, k);
#endif
    } else {
#ifdef INJECT_TRACEPARENT
        /* This request went out with a traceparent naming the span of exchange eid. */
        struct inj_choice *ch = inject_ids.lookup(&tid);
        if (ch && ch->eid) {
            st->exchange_id = ch->eid;
            int slot = IS_TAKEN;
            __u64 *v = inject_stats.lookup(&slot);
            if (v)
                *v += 1;
        }
#endif
        snapshot_ctx(st, k->tgid, k->fd);
        st->parent_exchange_id =
            client_parent(k->tgid, tid, st->has_ctx ? st->ctx.server_peer_port : 0);
    }
}

/* Appends user bytes at buf[off] without passing cap; returns the new fill. cap is a power of
 * two known at each (inlined) call site, and buf has room for 2 * cap: the verifier bounds
 * offset and length separately, never their sum. */
static __always_inline __u32 append_user(__u8 *buf, __u32 off, __u32 cap, const void *src,
                                         __u64 len)
{
    if (off >= cap || len == 0)
        return off;
    __u32 n = len > cap ? cap : len;
    if (n > cap - off)
        n = cap - off;
    if (read_user(&buf[off & (cap - 1)], n & (cap * 2 - 1), src) == 0)
        return off + n;
    return off;
}

static __always_inline void capture_req(struct exchange *st, const void *src, __u64 len)
{
    st->req_cap = append_user(st->req, st->req_cap, REQ_CAP, src, len);
}

static __always_inline void capture_resp(struct exchange *st, const void *src, __u64 len)
{
    st->resp_cap = append_user(st->resp, st->resp_cap, RESP_CAP, src, len);
}

static __always_inline void capture(struct exchange *st, int req_dir, const void *src, __u64 len)
{
    if (req_dir)
        capture_req(st, src, len);
    else
        capture_resp(st, src, len);
}

static __always_inline void capture_io(struct exchange *st, int req_dir, struct io_args *a,
                                       __u64 ret)
{
    if (a->kind == IO_BUF) {
        capture(st, req_dir, (const void *)a->ptr, ret);
        return;
    }
    __u64 left = ret;
#pragma unroll
    for (int i = 0; i < MAX_IOV; i++) {
        if (i >= a->vlen || left == 0)
            break;
        struct u_iovec iov = {};
        if (read_user(&iov, sizeof(iov), (const void *)(a->ptr + i * sizeof(iov))))
            break;
        __u64 take = iov.len < left ? iov.len : left;
        capture(st, req_dir, (const void *)iov.base, take);
        left -= take;
    }
}

static __always_inline struct exchange *get_conn(struct sock_key *k, struct sock_info *si)
{
    struct exchange *st = conns.lookup(k);
    if (st)
        return st;
    int zero = 0;
    struct exchange *z = zero_exchange.lookup(&zero);
    if (!z)
        return 0;
    conns.update(k, z);
    st = conns.lookup(k);
    if (!st)
        return 0;
    st->tgid = k->tgid;
    st->fd = k->fd;
    st->role = si->role;
    st->family = si->family;
    st->peer_port = si->peer_port;
    st->listen_fd = si->listen_fd;
    st->conn_id = si->conn_id;
    __builtin_memcpy(st->peer_addr, si->peer_addr, sizeof(st->peer_addr));
    stat_inc(ST_CONN_CREATED);
    return st;
}

#define INTERIM_MAX 64

/* Whether everything answered so far is one interim response (1xx but 101, e.g. "HTTP/1.1 100
 * Continue\r\n\r\n"), after which request bytes continue the same request. Only short answers
 * that were captured whole qualify, and their head must end exactly at the last byte. */
static __always_inline int interim_only(struct exchange *st)
{
    __u64 n = st->resp_bytes;
    if (n < 16 || n > INTERIM_MAX || n != st->resp_cap)
        return 0;
    __u8 *r = st->resp;
    if (r[0] != 'H' || r[1] != 'T' || r[2] != 'T' || r[3] != 'P' || r[4] != '/' || r[9] != '1')
        return 0;
    if (r[10] == '0' && r[11] == '1')
        return 0;
#pragma unroll
    for (int i = 12; i < INTERIM_MAX - 3; i++) {
        if (i + 3 > n)
            break;
        if (r[i] == '\n' && r[i + 1] == '\r' && r[i + 2] == '\n')
            return i + 3 == n;
    }
    return 0;
}

static __always_inline void chunk_copy(struct chunk *c, const void *src, __u64 len)
{
    c->cap = append_user(c->data, c->cap, CHUNK_CAP, src, len);
}

static __always_inline struct chunk *chunk_start(struct sock_key *k, struct sock_info *si,
                                                 __u32 tid)
{
    int zero = 0;
    struct chunk *c = chunk_scratch.lookup(&zero);
    if (!c)
        return 0;
    c->type = EV_CHUNK;
    c->tgid = k->tgid;
    c->fd = k->fd;
    c->role = si->role;
    c->family = si->family;
    c->peer_port = si->peer_port;
    c->listen_fd = si->listen_fd;
    c->conn_id = si->conn_id;
    __builtin_memcpy(c->peer_addr, si->peer_addr, sizeof(c->peer_addr));
    c->tid = tid;
    c->cap = 0;
    c->len = 0;
    c->flags = 0;
    c->has_ctx = 0;
    c->from_client = 0;
    c->parent_exchange_id = 0;
    c->ts_ns = bpf_ktime_get_ns();
    __builtin_memcpy(c->local_addr, si->local_addr, sizeof(c->local_addr));
    c->local_port = si->local_known ? si->local_port : 0;
    c->peer_traced = 0;
    c->tls = si->tls;
    if (si->role == ROLE_SERVER) {
        struct addr_port ap;
        addr_key(&ap, si->peer_addr, si->peer_port);
        c->peer_traced = client_by_port.lookup(&ap) != 0;
    }
    return c;
}

static __always_inline void chunk_emit(struct chunk *c)
{
    __u64 n = c->cap;
    /* Keep the clamp even where the compiler can prove it (the SSL uprobe path): the verifier
     * needs it to bound the output size. */
    asm volatile("" : "+r"(n));
    if (n > CHUNK_CAP)
        n = CHUNK_CAP;
    __u64 size = offsetof(struct chunk, data) + n;
    if (events.ringbuf_output(c, size, wakeup_flag(size)))
        stat_inc(ST_LOST);
    else
        stat_inc(ST_CHUNKS);
}

/* The thread's context rides on the chunks the application itself writes: a client's requests
 * and a server's responses. */
static __always_inline void chunk_ctx(struct chunk *c, __u32 tgid, __u32 fd, __u32 tid)
{
    struct bridge_ctx_value *v = lookup_ctx(tgid, fd);
    if (v) {
        __builtin_memcpy(&c->ctx, v, sizeof(c->ctx));
        c->has_ctx = 1;
    }
    if (c->role == ROLE_CLIENT)
        c->parent_exchange_id = client_parent(tgid, tid, c->has_ctx ? c->ctx.server_peer_port : 0);
}

static __always_inline void stream_io(struct sock_key *k, struct sock_info *si, int dir,
                                      struct io_args *a, long ret)
{
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    struct chunk *c = chunk_start(k, si, tid);
    if (!c)
        return;
    c->from_client = (si->role == ROLE_SERVER) == (dir == DIR_IN);
    c->len = ret;
    if (c->from_client == (si->role == ROLE_CLIENT))
        chunk_ctx(c, k->tgid, k->fd, tid);
    if (a->kind == IO_BUF) {
        chunk_copy(c, (const void *)a->ptr, ret);
    } else {
        __u64 left = ret;
        for (int i = 0; i < STREAM_MAX_IOV; i++) {
            if (i >= a->vlen || left == 0)
                break;
            struct u_iovec iov = {};
            if (read_user(&iov, sizeof(iov), (const void *)(a->ptr + i * sizeof(iov))))
                break;
            __u64 take = iov.len < left ? iov.len : left;
            chunk_copy(c, (const void *)iov.base, take);
            left -= take;
        }
    }
    chunk_emit(c);
}

/* The first request bytes decide how a connection is traced: the HTTP/2 client preface
 * ("PRI * HTTP/2.0") switches it to stream mode. */
static __always_inline void choose_mode(struct sock_info *si, struct io_args *a)
{
    __u64 ptr = a->ptr;
    if (a->kind != IO_BUF) {
        struct u_iovec iov = {};
        if (a->vlen == 0 || read_user(&iov, sizeof(iov), (const void *)ptr))
            return;
        ptr = iov.base;
    }
    char head[4] = {};
    if (read_user(head, sizeof(head), (const void *)ptr))
        return;
    si->mode = (head[0] == 'P' && head[1] == 'R' && head[2] == 'I' && head[3] == ' ')
                   ? MODE_STREAM
                   : MODE_EXCHANGE;
}

static __always_inline void forget_conn_state(struct sock_key *k)
{
    if (conns.delete(k) == 0)
        stat_inc(ST_CONN_DELETED);
    inflight.delete(k);
}

/* --- TLS (OpenSSL uprobes) ------------------------------------------------------------ */

/* An SSL_read/SSL_write call in progress on a thread. */
struct ssl_call {
    __u64 ssl;
    __u64 buf;
    __u64 nbytes_ptr; /* size_t *readbytes / *written of the _ex variants, else 0 */
    __u64 start_ns;
    __u32 dir; /* DIR_IN for SSL_read*, DIR_OUT for SSL_write*: one return program for all */
    __u32 _pad;
};

struct ssl_key {
    __u32 tgid;
    __u32 _pad;
    __u64 ssl;
};

BPF_HASH(ssl_calls, __u32, struct ssl_call, THREAD_MAX);
/* The socket of an SSL object: learned from the syscall a thread makes inside an SSL call, or
 * (memory-BIO stacks such as Node's, whose socket I/O happens outside SSL calls) from the TLS
 * socket the thread last moved bytes on. */
BPF_TABLE("lru_hash", struct ssl_key, __u32, ssl_fd, SOCK_MAX);
BPF_TABLE("lru_hash", __u32, __u32, tls_last_fd, SOCK_MAX);
/* The way back, so closing a socket forgets its SSL object: SSL objects are freed with their
 * connection and their addresses reused for the next one, which must not inherit the old fd. */
BPF_TABLE("lru_hash", struct sock_key, __u64, ssl_by_fd, SOCK_MAX);

static __always_inline void remember_ssl_fd(struct ssl_key *sk, __u32 fd)
{
    ssl_fd.update(sk, &fd);
    struct sock_key k = {.tgid = sk->tgid, .fd = fd};
    __u64 ssl = sk->ssl;
    ssl_by_fd.update(&k, &ssl);
}

static __always_inline void forget_ssl_fd(struct sock_key *k)
{
    __u64 *sslp = ssl_by_fd.lookup(k);
    if (!sslp)
        return;
    struct ssl_key sk = {.tgid = k->tgid, .ssl = *sslp};
    __u32 *fdp = ssl_fd.lookup(&sk);
    if (fdp && *fdp == k->fd)
        ssl_fd.delete(&sk);
    ssl_by_fd.delete(k);
}

static __always_inline int conn_io(struct sock_key *kp, struct sock_info *si, int dir,
                                   struct io_args *ap, long ret, __u32 tid);

#define TLS_CHECKS 2

static __always_inline void tls_learn_fd(struct sock_info *si, struct sock_key *k, __u32 tid)
{
    /* A connection whose first request-direction I/Os carried no TLS record head is plaintext
     * for good (tls_socket_io stops looking then too): skip the SSL-call look-up. */
    if (!si->tls && si->tls_checks >= TLS_CHECKS)
        return;
    struct ssl_call *c = ssl_calls.lookup(&tid);
    if (!c)
        return;
    struct ssl_key sk = {.tgid = k->tgid, .ssl = c->ssl};
    remember_ssl_fd(&sk, k->fd);
    if (!si->tls) {
        si->tls = 1;
        forget_conn_state(k);
    }
}

/* A TLS record head: handshake (22) or application data (23), version 3.x. Returns 1 for a
 * record head, 2 for a read too short to tell whose first byte fits (nginx peeks one byte of
 * the ClientHello with MSG_PEEK), 0 otherwise. */
static __always_inline int tls_record_head(struct io_args *a, long ret)
{
    __u64 ptr = a->ptr;
    if (a->kind != IO_BUF) {
        struct u_iovec iov = {};
        if (a->vlen == 0 || read_user(&iov, sizeof(iov), (const void *)ptr))
            return 0;
        ptr = iov.base;
    }
    __u8 head[3] = {};
    if (read_user(head, sizeof(head), (const void *)ptr))
        return 0;
    if (head[0] != 22 && head[0] != 23)
        return 0;
    if (ret < 3)
        return 2;
    return head[1] == 3 && head[2] <= 4;
}

/* Socket bytes of a TLS connection are ciphertext: never an exchange, a chunk or unknown
 * traffic. A connection is known to be TLS from a thread inside an SSL call touching it, or
 * from a TLS record head among its first request-direction I/Os (two: PostgreSQL and MySQL
 * send a plaintext SSL request before the ClientHello). Returns 1 when the bytes are skipped. */
static __always_inline int tls_socket_io(struct sock_info *si, struct sock_key *k, __u32 tid,
                                         int dir, struct io_args *a, long ret)
{
    if (!si->tls && si->tls_checks < TLS_CHECKS &&
        (si->role == ROLE_SERVER) == (dir == DIR_IN)) {
        int head = tls_record_head(a, ret);
        if (head == 2)
            return 1; /* too short to tell: neither a check nor plaintext */
        si->tls_checks += 1;
        if (head) {
            si->tls = 1;
            forget_conn_state(k);
        }
    }
    if (!si->tls)
        return 0;
    __u32 fd = k->fd;
    tls_last_fd.update(&tid, &fd);
    return 1;
}

static __always_inline int ssl_enter(struct pt_regs *ctx, int ex, int dir)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u32 tgid = id >> 32;
    if (!procs.lookup(&tgid))
        return 0;
    __u32 tid = (__u32)id;
    struct ssl_call c = {};
    c.ssl = PT_REGS_PARM1(ctx);
    c.buf = PT_REGS_PARM2(ctx);
    c.nbytes_ptr = ex ? PT_REGS_PARM4(ctx) : 0;
    c.start_ns = bpf_ktime_get_ns();
    c.dir = dir;
    if (ssl_calls.update(&tid, &c))
        stat_inc(ST_TRACK_FULL);
    return 0;
}

static __always_inline int ssl_exit(struct pt_regs *ctx)
{
    __u64 id = bpf_get_current_pid_tgid();
    __u32 tid = (__u32)id;
    struct ssl_call *cp = ssl_calls.lookup(&tid);
    if (!cp)
        return 0;
    struct ssl_call c = *cp;
    ssl_calls.delete(&tid);
    /* SSL_read/SSL_write and the _ex variants return int: the upper half of the register is
     * not part of the value. */
    int rc = (int)PT_REGS_RC(ctx);
    if (rc <= 0)
        return 0;
    __u64 n = rc;
    if (c.nbytes_ptr) {
        if (rc != 1 || read_user(&n, sizeof(n), (const void *)c.nbytes_ptr))
            return 0;
    }
    if (n == 0)
        return 0;
    __u32 tgid = id >> 32;
    struct ssl_key sk = {.tgid = tgid, .ssl = c.ssl};
    __u32 *fdp = ssl_fd.lookup(&sk);
    __u32 fd;
    if (fdp) {
        fd = *fdp;
    } else {
        __u32 *last = tls_last_fd.lookup(&tid);
        if (!last)
            return 0;
        fd = *last;
        remember_ssl_fd(&sk, fd);
    }
    struct sock_key k = {.tgid = tgid, .fd = fd};
    struct sock_info *si = socks.lookup(&k);
    if (!si || !si->tls)
        return 0;
    struct io_args a = {.ptr = c.buf, .fd = fd, .kind = IO_BUF, .vlen = 0};
    return conn_io(&k, si, c.dir, &a, (long)n, tid);
}

/* The entry programs record the direction, so ONE return program serves all four functions:
 * BCC inlines everything, and each copy of the connection state machine costs compile time at
 * every agent start (kernel_side/tls.py names these in PROBES). */
int tls_enter_read(struct pt_regs *ctx) { return ssl_enter(ctx, 0, DIR_IN); }
int tls_enter_read_ex(struct pt_regs *ctx) { return ssl_enter(ctx, 1, DIR_IN); }
int tls_enter_write(struct pt_regs *ctx) { return ssl_enter(ctx, 0, DIR_OUT); }
int tls_enter_write_ex(struct pt_regs *ctx) { return ssl_enter(ctx, 1, DIR_OUT); }
int tls_exit(struct pt_regs *ctx) { return ssl_exit(ctx); }

static __always_inline int switching_protocols(struct exchange *st)
{
    if (st->resp_cap < 12)
        return 0;
    __u8 *r = st->resp;
    return r[0] == 'H' && r[1] == 'T' && r[2] == 'T' && r[3] == 'P' && r[4] == '/' &&
           r[5] == '1' && r[6] == '.' && r[8] == ' ' && r[9] == '1' && r[10] == '0' &&
           r[11] == '1';
}

/* The data syscalls' arguments are read at their exit, from the registers the syscall entry
 * saved (bpf_task_pt_regs): no entry programs, no per-thread bookkeeping map. An entry program
 * per syscall cost the traced application its run (145-440 ns, a socket look-up and a map
 * update) plus the tracepoint's own dispatch (about 140 ns for an empty program here), and the
 * exit then looked up and deleted that map entry; a thread blocked in read() no longer holds
 * an entry either, so there is no max_threads bound on plain socket I/O. x86_64 only: the
 * syscall numbers and the registers that carry the arguments (di, si, dx) are that ABI's
 * (kernel_side/agent.py refuses other machines). */
#define NR_READ 0
#define NR_WRITE 1
#define NR_READV 19
#define NR_WRITEV 20
#define NR_SENDTO 44
#define NR_RECVFROM 45
#define NR_SENDMSG 46
#define NR_RECVMSG 47

/* struct pt_regs from dx on: the third, second and first syscall argument, then the number. */
struct sys_regs {
    __u64 dx;
    __u64 si;
    __u64 di;
    __u64 orig_ax;
};

static long (*read_kernel)(void *dst, __u32 size, const void *src) =
    (void *)BPF_FUNC_probe_read_kernel;

/* The current syscall's saved registers; 0 when read. Plain loads: the helper returns a
 * BTF-typed pointer, so the verifier allows them (JIT-ed as loads with a fault fix-up), one
 * helper call fewer than bpf_probe_read_kernel on every data syscall. */
static __always_inline int syscall_regs(struct sys_regs *r)
{
    struct task_struct *t = bpf_get_current_task_btf();
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(t);
    r->dx = regs->dx;
    r->si = regs->si;
    r->di = regs->di;
    r->orig_ax = regs->orig_ax;
    return 0;
}

/* What the data syscall `nr`, called with `r`, handed over; 0 when it is one of the eight. */
static __always_inline int io_args_of(int nr, struct sys_regs *r, struct io_args *a)
{
    a->fd = (__u32)r->di;
    a->ptr = r->si;
    a->kind = IO_BUF;
    a->vlen = 0;
    switch (nr) {
    case NR_READ:
    case NR_RECVFROM:
        a->dir = DIR_IN;
        return 0;
    case NR_WRITE:
    case NR_SENDTO:
        a->dir = DIR_OUT;
        return 0;
    case NR_READV:
    case NR_WRITEV:
        a->dir = nr == NR_READV ? DIR_IN : DIR_OUT;
        a->kind = IO_IOVEC;
        a->vlen = r->dx;
        return 0;
    case NR_RECVMSG:
    case NR_SENDMSG: {
        /* The kernel writes back only the lengths and flags of the msghdr: the iovec pointer
         * and count are still the caller's at exit. */
        struct u_msghdr m = {};
        if (read_user(&m, sizeof(m), (const void *)r->si))
            return -1;
        a->dir = nr == NR_RECVMSG ? DIR_IN : DIR_OUT;
        a->kind = IO_IOVEC;
        a->ptr = m.iov;
        a->vlen = m.iovlen;
        return 0;
    }
    }
    return -1;
}

#ifdef INJECT_TRACEPARENT
/* The injector's sk_msg program runs inside the write and has no registers to read: the
 * write-side entry programs (only with injection on) name the write to it in active_io. */
static __always_inline int on_enter_write(__u32 fd, __u64 ptr)
{
    __u64 id = bpf_get_current_pid_tgid();
    struct sock_key k = {.tgid = id >> 32, .fd = fd};
    if (!socks.lookup(&k))
        return 0;
    __u32 tid = (__u32)id;
    struct io_args a = {.ptr = ptr, .fd = fd, .kind = IO_BUF, .dir = DIR_OUT};
    if (active_io.update(&tid, &a))
        stat_inc(ST_TRACK_FULL);
    return 0;
}

static __always_inline int on_enter_sendmsg(__u32 fd, __u64 msg)
{
    struct u_msghdr m = {};
    if (read_user(&m, sizeof(m), (const void *)msg))
        return 0;
    return on_enter_write(fd, m.iov);
}
#endif

static __always_inline int data_io(int nr, long ret, __u64 id)
{
    if (ret <= 0)
        return 0;
    struct sys_regs r;
    if (syscall_regs(&r))
        return 0;
    struct sock_key k = {.tgid = id >> 32, .fd = (__u32)r.di};
    struct sock_info *si = socks.lookup(&k);
    if (!si)
        return 0;
    struct io_args a = {};
    if (io_args_of(nr, &r, &a))
        return 0;
    __u32 tid = (__u32)id;
    tls_learn_fd(si, &k, tid);
    if (tls_socket_io(si, &k, tid, a.dir, &a, ret))
        return 0;
    return conn_io(&k, si, a.dir, &a, ret, tid);
}

static __always_inline int on_exit_io(int nr, long ret)
{
    __u64 id = bpf_get_current_pid_tgid();
    data_io(nr, ret, id);
#ifdef INJECT_TRACEPARENT
    if (nr == NR_WRITE || nr == NR_SENDTO || nr == NR_WRITEV || nr == NR_SENDMSG) {
        /* The injector's choice belongs to this write alone (start_exchange has taken it). */
        __u32 tid = (__u32)id;
        active_io.delete(&tid);
        if (inject_ids.lookup(&tid))
            inject_ids.delete(&tid);
    }
#endif
    return 0;
}

/* The per-connection state machine: bytes of one read (dir DIR_IN) or write (DIR_OUT) of
 * `ret` bytes described by `a`, on connection k, by thread tid. Fed by the socket syscalls
 * and, for TLS connections, by the SSL_read/SSL_write uprobes with the plaintext. */
static __always_inline int conn_io(struct sock_key *kp, struct sock_info *si, int dir,
                                   struct io_args *ap, long ret, __u32 tid)
{
    struct sock_key k = *kp;
    struct io_args a = *ap;
    if (si->mode == MODE_UNKNOWN && (si->role == ROLE_SERVER) == (dir == DIR_IN))
        choose_mode(si, &a);
    if (si->mode == MODE_STREAM) {
        stream_io(&k, si, dir, &a, ret);
        return 0;
    }
    struct exchange *st = get_conn(&k, si);
    if (!st)
        return 0;
    st->tls = si->tls;
    if (!st->local_port && si->local_known) {
        __builtin_memcpy(st->local_addr, si->local_addr, sizeof(st->local_addr));
        st->local_port = si->local_port;
    }
    if (!st->peer_port && si->peer_port) {
        __builtin_memcpy(st->peer_addr, si->peer_addr, sizeof(st->peer_addr));
        st->peer_port = si->peer_port;
        st->family = si->family;
    }
    __u64 now = bpf_ktime_get_ns();
    int req_dir = (st->role == ROLE_SERVER) == (dir == DIR_IN);
    if (req_dir) {
        if (st->phase == PHASE_RESP && interim_only(st)) {
            /* "100 Continue" between a request head and its body: same exchange. */
            st->phase = PHASE_REQ;
            inflight.delete(&k);
        }
        if (st->phase == PHASE_RESP) {
            emit(st);
            inflight.delete(&k);
            st->phase = PHASE_IDLE;
        }
        if (st->phase == PHASE_IDLE)
            start_exchange(st, &k, tid);
        capture_io(st, 1, &a, ret);
        st->req_bytes += ret;
        st->req_calls += 1;
        st->req_end_ns = now;
    } else {
        if (st->phase == PHASE_IDLE) {
            if (st->role != ROLE_CLIENT || st->exchange_id || st->resp_calls) {
                /* Response bytes with no request seen: the capture began mid-exchange. */
                stat_inc(ST_UNMATCHED_RESPONSE);
                return 0;
            }
            /* The server speaks first on a fresh client connection (MySQL's greeting names
             * the server and its version): an exchange with no request, so user space sees
             * those bytes instead of their being dropped. */
            start_exchange(st, &k, tid);
        }
        if (st->phase == PHASE_REQ) {
            st->phase = PHASE_RESP;
            st->resp_start_ns = now;
            st->resp_tid = tid;
            mark_peer(st);
            if (st->role == ROLE_SERVER)
                snapshot_ctx(st, k.tgid, k.fd);
            inflight.update(&k, &now);
        }
        capture_io(st, 0, &a, ret);
        st->resp_bytes += ret;
        st->resp_calls += 1;
        st->resp_end_ns = now;
        if (st->resp_calls == 1 && switching_protocols(st)) {
            /* "101 Switching Protocols" (Upgrade: h2c): the HTTP/1.1 exchange ends here and
             * the connection speaks HTTP/2 from the next byte on. */
            emit(st);
            if (conns.delete(&k) == 0)
                stat_inc(ST_CONN_DELETED);
            inflight.delete(&k);
            si->mode = MODE_STREAM;
        }
    }
    return 0;
}

/* --- data syscalls ------------------------------------------------------------------------ */

#ifdef INJECT_TRACEPARENT
TRACEPOINT_PROBE(syscalls, sys_enter_write) { return on_enter_write(args->fd, (__u64)args->buf); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendto) { return on_enter_write(args->fd, (__u64)args->buff); }
TRACEPOINT_PROBE(syscalls, sys_enter_writev) { return on_enter_write(args->fd, (__u64)args->vec); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) { return on_enter_sendmsg(args->fd, (__u64)args->msg); }
#endif

/* Every sys_exit_* tracepoint has the same record (syscall number at offset 8, the return value
 * at 16; kernel_side/agent.py checks the tracefs formats), and the number names the direction
 * and the arguments' shape: so ONE exit program serves the eight data syscalls. BCC inlines
 * every helper, and eight copies of the connection state machine were 60% of the compile at
 * each start. */
struct sys_exit_record {
    __u64 common;
    int syscall_nr;
    int _pad;
    long ret;
};

int data_exit(struct sys_exit_record *args) { return on_exit_io(args->syscall_nr, args->ret); }

/* --- socket addresses (for same-node stitching) ------------------------------------------ */

#define IPPROTO_TCP_ 6

/* The head of struct sock_common, whose layout has not changed since Linux 2.6: both IPv4
 * addresses, then the hash, the peer port (network order) and the local port (host order),
 * then the family. */
struct sk_head {
    __u8 daddr[4];
    __u8 rcv_saddr[4];
    __u32 hash;
    __u16 dport_be;
    __u16 num;
    __u16 family;
};

/* Where struct sock_common keeps the IPv6 addresses on this kernel: found in its BTF by user
 * space (kernel_side/btf.py); 0 when unknown, and then only IPv4 sockets are learned. */
#ifndef SKC_V6_DADDR_OFF
#define SKC_V6_DADDR_OFF 0
#define SKC_V6_RCV_SADDR_OFF 0
#endif

/* A TCP socket's addresses, read from the kernel's socket itself. This used to come from
 * sock:inet_sock_set_state, which fires for every TCP state change of every socket on the
 * machine (10 runs per short connection, 1.4 µs in all) to fill a map most sockets were never
 * looked up in. Returns 0 when *t is filled. */
static __always_inline int read_sk(const void *skp, struct sk_tuple *t)
{
    struct sk_head h = {};
    if (bpf_probe_read_kernel(&h, sizeof(h), skp))
        return -1;
    t->family = h.family;
    t->sport = h.num;
    t->dport = (h.dport_be >> 8) | ((h.dport_be & 0xff) << 8);
    if (h.family == AF_INET_) {
        __builtin_memcpy(t->saddr, h.rcv_saddr, 4);
        __builtin_memcpy(t->daddr, h.daddr, 4);
        return 0;
    }
    if (h.family == AF_INET6_ && SKC_V6_DADDR_OFF) {
        if (bpf_probe_read_kernel(t->saddr, 16, (const __u8 *)skp + SKC_V6_RCV_SADDR_OFF) ||
            bpf_probe_read_kernel(t->daddr, 16, (const __u8 *)skp + SKC_V6_DADDR_OFF))
            return -1;
        return 0;
    }
    return -1;
}

/* The connection's own address from its socket, and the peer's when the syscall named none
 * (accept4(fd, NULL, NULL)). Returns whether the peer was learned here. */
static __always_inline int take_addrs(struct sock_info *si, const struct sk_tuple *t)
{
    __builtin_memcpy(si->local_addr, t->saddr, sizeof(si->local_addr));
    si->local_port = t->sport;
    si->local_known = 1;
    if (si->peer_port || !t->dport)
        return 0;
    __builtin_memcpy(si->peer_addr, t->daddr, sizeof(si->peer_addr));
    si->peer_port = t->dport;
    if (!si->family)
        si->family = t->family;
    return 1;
}

/* A client connection's local port, for the server end on this node to find (mark_peer). */
static __always_inline void remember_client_port(const struct sock_info *si)
{
    struct addr_port ap;
    addr_key(&ap, si->local_addr, si->local_port);
    __u8 one = 1;
    client_by_port.update(&ap, &one);
}

#ifdef TASK_FILES_OFF
#define SOCK_STREAM_ 1

/* The struct sock behind this thread's fd, through its fd table: task->files->fdt->fd[fd]
 * is the struct file, whose private_data is the struct socket. The offsets come from the
 * kernel's BTF (kernel_side/btf.py); BCC compiles against headers that may be another
 * kernel's. Only fds that accept returned or connect just used come here, and those are
 * sockets, so the file's type is not checked; the socket's is (UDP may connect too). */
static __always_inline const void *fd_sock(__u32 fd)
{
    const __u8 *t = (const __u8 *)bpf_get_current_task_btf();
    const __u8 *files = 0, *fdt = 0, *file = 0, *sock = 0, *sk = 0;
    const __u8 *arr = 0;
    __u32 max_fds = 0;
    __u16 type = 0;
    if (read_kernel(&files, sizeof(files), t + TASK_FILES_OFF) || !files)
        return 0;
    if (read_kernel(&fdt, sizeof(fdt), files + FILES_FDT_OFF) || !fdt)
        return 0;
    if (read_kernel(&max_fds, sizeof(max_fds), fdt + FDT_MAX_FDS_OFF) || fd >= max_fds)
        return 0;
    if (read_kernel(&arr, sizeof(arr), fdt + FDT_FD_OFF) || !arr)
        return 0;
    if (read_kernel(&file, sizeof(file), arr + (__u64)fd * sizeof(void *)) || !file)
        return 0;
    if (read_kernel(&sock, sizeof(sock), file + FILE_PRIVATE_DATA_OFF) || !sock)
        return 0;
    if (read_kernel(&type, sizeof(type), sock + SOCKET_TYPE_OFF) || type != SOCK_STREAM_)
        return 0;
    if (read_kernel(&sk, sizeof(sk), sock + SOCKET_SK_OFF))
        return 0;
    return sk;
}

/* take_addrs once, when the connection is made. This replaced sock_send_length and
 * sock_recv_length programs that learned them at the first send or receive: those fired for
 * every send and receive on the machine, about 2.5 µs per request under gunicorn. */
static __always_inline void sock_addrs(struct sock_info *si, __u32 fd)
{
    const void *sk = fd_sock(fd);
    struct sk_tuple t = {};
    if (sk && read_sk(sk, &t) == 0)
        take_addrs(si, &t);
}
#else
static __always_inline void sock_addrs(struct sock_info *si, __u32 fd) {}
#endif

/* --- connection lifecycle ----------------------------------------------------------------- */

/* Reads a sockaddr the application handed to accept/connect. Returns 0 for TCP/IP families
 * (and for a NULL address, which accept allows), -1 for anything else (unix sockets...). */
static __always_inline int read_peer(__u64 addr, struct sock_info *si)
{
    if (!addr)
        return 0;
    __u16 family = 0;
    if (read_user(&family, sizeof(family), (const void *)addr))
        return -1;
    __u16 port_be = 0;
    read_user(&port_be, sizeof(port_be), (const void *)(addr + 2));
    si->family = family;
    si->peer_port = (port_be >> 8) | ((port_be & 0xff) << 8);
    if (family == AF_INET_) {
        read_user(si->peer_addr, 4, (const void *)(addr + 4));
        return 0;
    }
    if (family == AF_INET6_) {
        read_user(si->peer_addr, 16, (const void *)(addr + 8));
        return 0;
    }
    return -1;
}

static __always_inline void forget_conn(struct sock_key *k)
{
    if (conns.delete(k) == 0)
        stat_inc(ST_CONN_DELETED);
    inflight.delete(k);
}

/* A new `socks` entry, counted only when the key was not there (a reused fd whose close was
 * not seen, e.g. a dup2 over it, replaces in place). */
static __always_inline void remember_sock(struct sock_key *k, struct sock_info *si)
{
    if (socks.insert(k, si) == 0) {
        stat_inc(ST_SOCK_CREATED);
        return;
    }
    socks.update(k, si);
}

/* accept/accept4/connect: the arguments come from the saved registers at exit, as for the
 * data syscalls (fd in di, the sockaddr in si). */
static __always_inline int conn_syscall_args(__u32 tgid, struct sys_regs *r)
{
    if (!procs.lookup(&tgid))
        return -1;
    return syscall_regs(r);
}

static __always_inline int on_exit_accept(long ret)
{
    if (ret < 0)
        return 0;
    __u64 id = bpf_get_current_pid_tgid();
    struct sys_regs r;
    if (conn_syscall_args(id >> 32, &r))
        return 0;
    struct sock_info si = {};
    if (read_peer(r.si, &si))
        return 0;
    sock_addrs(&si, (__u32)ret);
    si.role = ROLE_SERVER;
    si.listen_fd = (__u32)r.di;
    si.conn_id = next_id();
    struct sock_key k = {.tgid = id >> 32, .fd = (__u32)ret};
    forget_conn(&k);
    remember_sock(&k, &si);
    if (si.peer_port) {
        struct peer_key pk = {.tgid = k.tgid, .port = si.peer_port};
        server_by_peer.update(&pk, &k.fd);
    }
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept4) { return on_exit_accept(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_accept) { return on_exit_accept(args->ret); }

TRACEPOINT_PROBE(syscalls, sys_exit_connect)
{
    if (args->ret < 0 && args->ret != -EINPROGRESS_)
        return 0;
    __u64 id = bpf_get_current_pid_tgid();
    struct sys_regs r;
    if (conn_syscall_args(id >> 32, &r))
        return 0;
    struct sock_info si = {};
    if (!r.si || read_peer(r.si, &si))
        return 0;
    sock_addrs(&si, (__u32)r.di);
    si.role = ROLE_CLIENT;
    si.conn_id = next_id();
    struct sock_key k = {.tgid = id >> 32, .fd = (__u32)r.di};
    forget_conn(&k);
    remember_sock(&k, &si);
    if (si.local_known)
        remember_client_port(&si);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_close)
{
    __u64 id = bpf_get_current_pid_tgid();
    struct sock_key k = {.tgid = id >> 32, .fd = args->fd};
    struct sock_info *si = socks.lookup(&k);
    if (!si)
        return 0;
    if (si->mode == MODE_STREAM) {
        struct chunk *c = chunk_start(&k, si, (__u32)id);
        if (c) {
            c->flags = CHUNK_F_CLOSE;
            chunk_emit(c);
        }
    }
    if (si->role == ROLE_CLIENT && si->local_known) {
        struct addr_port ap;
        addr_key(&ap, si->local_addr, si->local_port);
        client_by_port.delete(&ap);
    }
    if (si->role == ROLE_SERVER && si->peer_port) {
        /* Only if it still names this connection (a later one may share the port). */
        struct peer_key pk = {.tgid = k.tgid, .port = si->peer_port};
        __u32 *pfd = server_by_peer.lookup(&pk);
        if (pfd && *pfd == k.fd)
            server_by_peer.delete(&pk);
    }
    if (si->tls)
        forget_ssl_fd(&k);
    struct exchange *st = conns.lookup(&k);
    if (st && st->phase != PHASE_IDLE) {
        st->phase = PHASE_CLOSED; /* the entry goes below */
        emit(st);
    }
    forget_conn(&k);
    if (socks.delete(&k) == 0)
        stat_inc(ST_SOCK_DELETED);
    /* The connection's context (bridge.annotate_connection) ends with it. */
    struct bridge_conn_key ck = {};
    if (ns_conn_key(k.tgid, k.fd, &ck) == 0)
        ctx_by_conn.delete(&ck);
    return 0;
}

#ifndef TASK_FILES_OFF
/* Without the fd-table offsets (not in this kernel's BTF, or EBPF_BRIDGE_NO_FD_WALK): learn the
 * addresses at the first send or receive.
 * Fires inside read/write/sendmsg/...: the thread's syscall in flight names the fd. */
static __always_inline int learn_local(const void *skp, __u16 protocol)
{
    if (protocol != IPPROTO_TCP_)
        return 0;
    __u64 id = bpf_get_current_pid_tgid();
    __u32 tgid = id >> 32;
    /* Most sends and receives on a node are other processes': a look-up is cheaper than the
     * register read. */
    if (!procs.lookup(&tgid))
        return 0;
    struct sys_regs r;
    if (syscall_regs(&r))
        return 0;
    /* Only the eight data syscalls carry the fd in di (sendfile, splice or io_uring also send
     * on sockets, from other arguments). */
    int nr = (int)r.orig_ax;
    if (nr != NR_READ && nr != NR_WRITE && nr != NR_RECVFROM && nr != NR_SENDTO &&
        nr != NR_READV && nr != NR_WRITEV && nr != NR_RECVMSG && nr != NR_SENDMSG)
        return 0;
    struct sock_key k = {.tgid = tgid, .fd = (__u32)r.di};
    /* Four of these fire per request; once the address is known they stop at this look-up. */
    struct sock_info *si = socks.lookup(&k);
    if (!si || si->local_known)
        return 0;
    struct sk_tuple t = {};
    if (read_sk(skp, &t))
        return 0;
    if (take_addrs(si, &t) && si->role == ROLE_SERVER) {
        struct peer_key pk = {.tgid = k.tgid, .port = si->peer_port};
        __u32 fd = k.fd;
        server_by_peer.update(&pk, &fd);
    }
    if (si->role == ROLE_CLIENT)
        remember_client_port(si);
    return 0;
}

TRACEPOINT_PROBE(sock, sock_send_length) { return learn_local(args->sk, args->protocol); }
TRACEPOINT_PROBE(sock, sock_recv_length) { return learn_local(args->sk, args->protocol); }
#endif

/* --- process lifecycle -------------------------------------------------------------------- */

static __always_inline void proc_event(__u32 what, __u32 pid, __u32 ppid, int urgent)
{
    struct proc_event ev = {.type = EV_PROC, .what = what, .pid = pid, .ppid = ppid};
    /* A short-lived process may be gone before user space reads /proc: keep its name. */
    bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
    __u64 flags = urgent ? BPF_RB_FORCE_WAKEUP : wakeup_flag(sizeof(ev));
    if (events.ringbuf_output(&ev, sizeof(ev), flags))
        stat_inc(ST_PROC_LOST);
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!procs.lookup(&tgid)) {
        struct exec_name name = {};
        bpf_get_current_comm(&name.comm, sizeof(name.comm));
        int zero = 0;
        struct proc_info *ns = default_ns.lookup(&zero);
        if (ns && exec_names.lookup(&name)) {
            struct proc_info copy = *ns;
            if (procs.update(&tgid, &copy))
                stat_inc(ST_TRACK_FULL);
            /* Wake user space now: it must read /proc/<pid> (resource, namespace) while a
             * short-lived process is still there. */
            struct proc_event ev = {.type = EV_PROC, .what = PROC_EXEC, .pid = tgid};
            /* With its name: a process quicker than user space (curl) is gone from /proc
             * before it is read, and its spans still need a service name. */
            __builtin_memcpy(ev.comm, name.comm, sizeof(ev.comm));
            if (events.ringbuf_output(&ev, sizeof(ev), BPF_RB_FORCE_WAKEUP))
                stat_inc(ST_PROC_LOST);
            return 0;
        }
    }
    /* A traced process that execs (a wrapper script starting the real binary) changes its
     * resource: wake user space while /proc still shows it. */
    proc_event(PROC_EXEC, tgid, 0, procs.lookup(&tgid) != 0);
    return 0;
}

TRACEPOINT_PROBE(task, task_newtask)
{
    if (args->clone_flags & CLONE_THREAD)
        return 0;
    __u32 parent = bpf_get_current_pid_tgid() >> 32;
    struct proc_info *pi = procs.lookup(&parent);
    if (!pi)
        return 0;
    /* Select the child at once so its first syscalls are seen; user space re-reads its pid
     * namespace, which differs after unshare(CLONE_NEWPID). */
    __u32 child = args->pid;
    struct proc_info copy = *pi;
    if (procs.update(&child, &copy))
        stat_inc(ST_TRACK_FULL);
    proc_event(PROC_FORK, child, parent, 1);
    return 0;
}

/* A thread's context must die with the thread: the kernel reuses thread ids, and an entry left
 * behind would hand one request's tenant to whichever thread, in any process, gets the id next.
 * Runs for every exiting thread: traced processes use their recorded namespace, any other
 * process the agent's own (the common case of an app annotating before it is selected). */
static __always_inline void forget_thread_ctx(__u32 tgid)
{
    struct bridge_ctx_key key = {};
    struct proc_info *pi = procs.lookup(&tgid);
    if (!pi) {
        int zero = 0;
        pi = default_ns.lookup(&zero);
        if (!pi || !pi->ns_ino)
            return;
    }
    struct bpf_pidns_info ns = {};
    if (bpf_get_ns_current_pid_tgid(pi->ns_dev, pi->ns_ino, &ns, sizeof(ns)))
        return;
    key.pidns_ino = pi->ns_ino;
    key.tid = ns.pid;
    struct bridge_ctx_cell *cell = own_cell(key.pidns_ino, key.tid);
    if (cell) {
        /* The thread is gone: its cell is free for whichever thread hashes to it next. */
        cell->live = 0;
        cell->owner = 0;
    }
    ctx_by_tid.delete(&key);
    server_by_tid.delete(&key);
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    forget_thread_ctx(tgid);
    if (!args->group_dead)
        return 0;
    if (!procs.lookup(&tgid))
        return 0;
    proc_event(PROC_EXIT, tgid, 0, 0);
    return 0;
}
