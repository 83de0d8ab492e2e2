"""A threaded HTTP/1.1 app that annotates every request and reports on itself, for the fault
and trust-model e2e tests.

  GET /bridge-status   bridge.status() as JSON, plus "annotate_exceptions": how many times
                       bridge.annotate raised in this process (it never should)
  GET /take-cell       mark this thread's ctx_cells cell as held by another thread (the case of
                       two threads whose ids hash to one cell); send it on a keep-alive
                       connection before any annotated request, so its thread uses ctx_by_tid
  GET /anything        bridge.annotate(tenant_id=<X-Tenant-ID>) then 200 with a short body

    python bridge_status_app.py --port 0 --ready-file PATH
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from _ready import write_ready

import bridge

_lock = threading.Lock()
_annotate_exceptions = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 65536  # head and body in one write (no Nagle/delayed-ACK stall on keep-alive)

    def log_message(self, *_: object) -> None:
        pass

    def _send(self, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        global _annotate_exceptions
        if self.path == "/bridge-status":
            st = bridge.status()
            doc = dataclasses.asdict(st) if dataclasses.is_dataclass(st) else dict(vars(st))
            with _lock:
                doc["annotate_exceptions"] = _annotate_exceptions
            self._send(json.dumps(doc).encode(), "application/json")
            return
        if self.path == "/take-cell":
            self._send(_take_cell().encode())
            return
        tenant = self.headers.get("X-Tenant-ID")
        if tenant:
            try:
                bridge.annotate(tenant_id=tenant)
            except Exception:
                with _lock:
                    _annotate_exceptions += 1
        self._send(f"ok {self.path}\n".encode())


def _take_cell() -> str:
    """Write another owner word into the calling thread's cell; returns what it did."""
    import mmap
    import os

    from bridge import _abi, _env
    from sdk_side import _bpf

    owner = _abi.cell_owner(os.stat("/proc/self/ns/pid").st_ino, threading.get_native_id())
    fd = _bpf.obj_get(_env.ctx_cells_pin(), 0)
    try:
        mem = mmap.mmap(fd, _abi.CTX_CELLS * _abi.CTX_CELL_SIZE, mmap.MAP_SHARED,
                        mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    off = _abi.cell_index(owner) * _abi.CTX_CELL_SIZE
    # The same thread id in a PID namespace no process has (inode numbers stop short of
    # 2**32 - 1): the probes and every writer see the cell as someone else's.
    other = (0xFFFFFFFF << 32) | (owner & 0xFFFFFFFF)
    assert other != owner
    mem[off : off + 8] = other.to_bytes(8, "little")
    mem.close()
    return json.dumps({"cell": off // _abi.CTX_CELL_SIZE, "owner": other})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-file")
    a = ap.parse_args()
    srv = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    srv.daemon_threads = True
    if a.ready_file:
        write_ready(a.ready_file, srv.server_address[1])
    srv.serve_forever()


if __name__ == "__main__":
    main()
