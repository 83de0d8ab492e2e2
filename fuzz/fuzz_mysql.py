"""Fuzz the MySQL/MariaDB packet parser (handshake, commands, replies) and its span builder."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fuzz._instrument import instrumented

with instrumented(__name__ == "__main__"):
    from kernel_side.protocols import mysql, mysql_spans

from fuzz._common import extra, run_builder, unpack
from fuzz._runner import main


def test_one_input(data: bytes) -> None:
    req, resp = unpack(data)
    total = len(req) + extra(data)
    mysql.split_packets(req)
    mysql.looks_like_command(req, total, resp)
    mysql.looks_like_handshake_response(req, resp)
    mysql.looks_like_auth_continuation(req, resp)
    hs = mysql.parse_handshake_response(req)
    cmds = mysql.parse_request(req, hs.capabilities if hs is not None else 0)
    for c in cmds:
        _ = c.text, c.statement_id
    for group in mysql.split_replies(resp):
        mysql.parse_reply(group, cmds[0].code if cmds else mysql.COM_QUERY)
    run_builder(mysql_spans, req, resp, data)


if __name__ == "__main__":
    main("mysql", test_one_input)
