"""The agent names which of its optional C parts are in use, and the switch turns them all off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kernel_side import assembly, events, ring
from kernel_side.agent import describe_accelerators
from kernel_side.export import otlp_json, otlp_wire
from kernel_side.protocols import http1

REPO = Path(__file__).resolve().parents[2]


def test_the_description_follows_each_module() -> None:
    text = describe_accelerators()
    c_part = text.split(";")[0]
    for name, used in (("HTTP/1 parser", http1.ACCELERATED),
                       ("OTLP protobuf encoder", otlp_wire.ACCELERATED),
                       ("OTLP/JSON writer", otlp_json.ACCELERATED),
                       ("ring-buffer reader", ring.BATCHED),
                       ("span ids and HTTP/1 attributes", assembly.ACCELERATED),
                       ("event decoder", events.ACCELERATED)):
        assert (name in c_part) == used, text
        assert name in text


def test_no_accel_switch_turns_every_agent_accelerator_off() -> None:
    code = "from kernel_side.agent import describe_accelerators; print(describe_accelerators())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "EBPF_BRIDGE_NO_ACCEL": "1"}, check=True).stdout
    assert out.strip() == ("C: none; pure Python: HTTP/1 parser, OTLP protobuf encoder, "
                           "OTLP/JSON writer, ring-buffer reader, span ids and HTTP/1 attributes, "
                           "event decoder")
