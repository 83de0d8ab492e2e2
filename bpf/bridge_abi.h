/* ebpf-bridge context-map ABI: the one C source of truth.
 *
 * bridge/_abi.py mirrors every number and layout here; tests/e2e/test_abi_header.py compiles
 * this header with BCC, loads it, and checks the two against each other. Change both together
 * and bump BRIDGE_ABI_VERSION: the version is part of the pin path, so an SDK built for another
 * version finds no map and stays a no-op instead of writing bytes the agent misreads.
 */
#ifndef EBPF_BRIDGE_ABI_H
#define EBPF_BRIDGE_ABI_H

#define BRIDGE_ABI_VERSION 1

/* Pinned under /sys/fs/bpf/ebpf_bridge/v<BRIDGE_ABI_VERSION>/ */
#define BRIDGE_PIN_ROOT "/sys/fs/bpf/ebpf_bridge"
#define BRIDGE_PIN_DIR "/sys/fs/bpf/ebpf_bridge/v1"
#define BRIDGE_CTX_BY_TID_PIN "/sys/fs/bpf/ebpf_bridge/v1/ctx_by_tid"
#define BRIDGE_CTX_BY_CONN_PIN "/sys/fs/bpf/ebpf_bridge/v1/ctx_by_conn"
#define BRIDGE_CTX_CELLS_PIN "/sys/fs/bpf/ebpf_bridge/v1/ctx_cells"

#define BRIDGE_CTX_MAX_ENTRIES 16384

/* Attribute limits. Keys longer than the limit are a caller error (ValueError); string values
 * longer than the limit are truncated; attributes past the count or byte budget are dropped. */
#define BRIDGE_MAX_ATTRS 8
#define BRIDGE_MAX_KEY_LEN 48
#define BRIDGE_MAX_STR_LEN 128
#define BRIDGE_ATTR_BYTES 320

/* Attribute encoding inside bridge_ctx_value.data, repeated attr_count times:
 *   u8 type, u8 key_len, u16 value_len (little endian), key bytes, value bytes
 * with value bytes: STR utf-8; INT 8 bytes signed LE; FLOAT 8 bytes IEEE-754 LE; BOOL 1 byte. */
#define BRIDGE_ATTR_STR 1
#define BRIDGE_ATTR_INT 2
#define BRIDGE_ATTR_FLOAT 3
#define BRIDGE_ATTR_BOOL 4

/* bridge_ctx_value.flags */
#define BRIDGE_CTX_F_TRUNCATED 0x1 /* the writer truncated or dropped something */
#define BRIDGE_CTX_F_SDK_SPAN 0x2  /* sdk_trace_id/sdk_span_id/sdk_span_kind are set */
/* Written from an asyncio task: the thread serves many requests at once, so a new inbound
 * request on it must not clear the entry (the SDK keeps it in step with the running task). */
#define BRIDGE_CTX_F_TASK_SCOPED 0x4

/* bridge_ctx_value.sdk_span_kind: the OTLP SpanKind numbers (0 = unspecified). */
#define BRIDGE_SDK_KIND_INTERNAL 1
#define BRIDGE_SDK_KIND_SERVER 2
#define BRIDGE_SDK_KIND_CLIENT 3
#define BRIDGE_SDK_KIND_PRODUCER 4
#define BRIDGE_SDK_KIND_CONSUMER 5

/* Keyed as both sides can name a thread: the PID namespace inode plus the thread id inside that
 * namespace. An app in a container cannot know its host tid; BPF gets the namespaced ids from
 * bpf_get_ns_current_pid_tgid(). */
struct bridge_ctx_key {
    __u64 pidns_ino;
    __u32 tid;
    __u32 _pad;
};

/* ctx_by_conn: context of one connection (socket fd) of one process, for servers where the
 * thread that writes is not the thread that annotated. tgid is the process id inside its own
 * PID namespace (os.getpid() in the app; bpf_get_ns_current_pid_tgid().tgid in BPF). Wins over
 * the thread's entry; the kernel deletes it when the socket is closed. */
struct bridge_conn_key {
    __u64 pidns_ino;
    __u32 tgid;
    __u32 fd;
};

struct bridge_ctx_value {
    __u16 version;
    __u8 attr_count;
    __u8 flags;
    __u16 data_len;
    /* The client port of the inbound connection this context belongs to (0 = unknown): the
     * agent parents the client exchanges made under this context below the server exchange
     * of that connection (the thread's latest inbound request is only right for
     * thread-per-request servers, never for an event loop serving many requests). */
    __u16 server_peer_port;
    /* OpenTelemetry SDK coexistence (flag BRIDGE_CTX_F_SDK_SPAN): the SDK span active on this
     * thread, written by sdk_side.otel.BridgeSpanProcessor. The agent parents its spans under
     * it and drops its own span where this one, of the same kind, covers the operation. */
    __u8 sdk_trace_id[16];
    __u8 sdk_span_id[8];
    __u8 sdk_span_kind;
    __u8 _pad2[7];
    __u8 data[BRIDGE_ATTR_BYTES];
};

/* ctx_cells: the same per-thread context in memory the application maps (an mmapable array),
 * so that annotate is a memory write instead of a bpf() call. Cell i belongs to the thread whose
 * owner word hashes to i (bridge_cell_index) and that claimed it (owner == its word, 0 = free);
 * a thread whose cell another thread holds, or whose PID namespace inode does not fit 32 bits,
 * uses ctx_by_tid instead. A cell is read and written only by its own thread (annotate in user
 * space; the probes in that thread's syscalls), so it needs no lock. The kernel clears ``live``
 * where it deletes a ctx_by_tid entry and frees the cell when the thread exits. Mapping needs a
 * read-write fd, so the pin stays 0600 root whatever --app-group says: members of the group
 * keep the write-only ctx_by_tid and cannot read other threads' context. */
#define BRIDGE_CTX_CELLS 16384
#define BRIDGE_CTX_CELL_BITS 14
#define BRIDGE_CELL_HASH 0x9E3779B97F4A7C15ULL

struct bridge_ctx_cell {
    __u64 owner; /* (pidns_ino << 32) | tid of the claiming thread; 0 = free */
    __u32 live;  /* 1: value holds the thread's context (a ctx_by_tid entry would exist) */
    __u32 _pad;
    struct bridge_ctx_value value;
};

static inline __u64 bridge_cell_owner(__u64 pidns_ino, __u32 tid)
{
    return (pidns_ino << 32) | tid;
}

static inline __u32 bridge_cell_index(__u64 owner)
{
    return (__u32)((owner * BRIDGE_CELL_HASH) >> (64 - BRIDGE_CTX_CELL_BITS));
}

#endif
