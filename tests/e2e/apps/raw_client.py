"""Zero-code HTTP/1.1 client for the injection tests. Writes its pid to --ready-file, waits for
--go-file (so the agent is attached before it connects), then sends the requests of --spec
(a JSON list of {"head": str, "body": str, "split": bool, "wait": path}) one after another
over ONE keep-alive connection, each with a single write unless "split" (head and body written
separately) and, with "wait", only once that file exists. Each response body (JSON) is
appended to --out + ".progress" as it arrives, and all of them are written to --out at the
end, one line each."""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path

from _http import read_message
from _ready import write_ready


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ready-file", required=True)
    ap.add_argument("--go-file", required=True)
    a = ap.parse_args()
    spec = json.loads(Path(a.spec).read_text())
    write_ready(a.ready_file, os.getpid())
    deadline = time.monotonic() + 120
    while not os.path.exists(a.go_file):
        if time.monotonic() > deadline:
            raise SystemExit("no go file")
        time.sleep(0.02)
    lines = []
    with socket.create_connection((a.host, a.port), timeout=30) as sock:
        rest = b""
        for req in spec:
            if req.get("wait"):
                while not os.path.exists(req["wait"]):
                    if time.monotonic() > deadline:
                        raise SystemExit(f"{req['wait']} never appeared")
                    time.sleep(0.02)
            head = req["head"].encode("latin-1")
            body = req.get("body", "").encode("latin-1")
            if req.get("split"):
                sock.sendall(head)
                sock.sendall(body)
            else:
                sock.sendall(head + body)
            msg = read_message(sock, rest)
            if msg is None:
                raise ConnectionError("server closed the connection")
            _, resp, rest = msg
            lines.append(resp.decode())
            with open(a.out + ".progress", "a") as progress:
                progress.write(resp.decode() + "\n")
    write_ready(a.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
