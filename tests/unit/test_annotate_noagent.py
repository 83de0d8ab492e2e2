"""``bridge.annotate`` with no agent: a cheap, silent, counted no-op that still checks its input."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import bridge
from bridge import _env
from sdk_side import _writer


@pytest.fixture()
def no_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    missing = tmp_path / "no-such-pin-dir"
    monkeypatch.setenv(_env.EBPF_BRIDGE_PIN_DIR, str(missing))
    assert not _writer.reconnect()
    yield missing
    monkeypatch.undo()
    _writer.reconnect()


def test_public_api() -> None:
    assert set(bridge.__all__) == {
        "AttrValue",
        "BridgeStatus",
        "KernelSpanContext",
        "annotate",
        "annotate_connection",
        "bind_request",
        "clear",
        "clear_connection",
        "context",
        "current_span_context",
        "propagate",
        "status",
    }
    for name in bridge.__all__:
        assert getattr(bridge, name).__doc__


def test_pin_dir_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_env.EBPF_BRIDGE_PIN_DIR, raising=False)
    assert _env.pin_dir() == bridge._abi.PIN_DIR
    assert _env.ctx_by_tid_pin() == bridge._abi.CTX_BY_TID_PIN
    monkeypatch.setenv(_env.EBPF_BRIDGE_PIN_DIR, "/tmp/x")
    assert _env.ctx_by_tid_pin() == "/tmp/x/ctx_by_tid"


def test_annotate_is_a_counted_noop(no_agent: Path) -> None:
    before = bridge.status()
    bridge.annotate(tenant_id="acme", user_id="u-42", n=1, ratio=0.5, beta=True)
    bridge.annotate(tenant_id="x" * 1000)  # too long, but nothing is encoded without an agent
    with bridge.context(feature_flag="new-checkout"):
        pass
    bridge.clear()
    after = bridge.status()
    assert not after.connected
    assert after.pin_path == str(no_agent / "ctx_by_tid")
    assert after.abi_version == bridge._abi.ABI_VERSION
    assert after.calls - before.calls == 3
    assert after.noop_calls - before.noop_calls == 3
    assert after.writes == before.writes
    assert after.errors == before.errors


def test_status_is_frozen(no_agent: Path) -> None:
    st = bridge.status()
    assert isinstance(st, bridge.BridgeStatus)
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.calls = 0  # type: ignore[misc]


@pytest.mark.parametrize("value", [None, b"raw", [1], {"a": 1}, object()])
def test_bad_type_raises_even_without_agent(no_agent: Path, value: object) -> None:
    before = bridge.status()
    bridge.annotate(tenant_id="warm the key cache")
    with pytest.raises(TypeError, match="'tenant_id'"):
        bridge.annotate(tenant_id=value)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="'tenant_id'"):
        bridge.context(tenant_id=value)  # type: ignore[arg-type]
    # The failed calls are not counted: they did nothing.
    assert bridge.status().calls - before.calls == 1


@pytest.mark.parametrize(
    ("key", "value"),
    [("1bad", "v"), ("a b", "v"), ("k" * 49, "v"), ("ratio", math.nan), ("n", 2**64)],
)
def test_bad_key_or_number_raises_value_error(no_agent: Path, key: str, value: object) -> None:
    bridge.annotate(ratio=0.5, n=1)  # cached keys take the fast validation path
    with pytest.raises(ValueError, match=repr(key)):
        bridge.annotate(**{key: value})  # type: ignore[arg-type]


def test_validation_happens_before_anything(no_agent: Path) -> None:
    before = bridge.status()
    with pytest.raises(TypeError, match="'bad'"):
        bridge.annotate(good="x", bad=object())  # type: ignore[arg-type]
    assert bridge.status() == before


def test_annotate_from_threads_never_raises(no_agent: Path) -> None:
    import threading

    errors: list[BaseException] = []

    def work() -> None:
        try:
            for i in range(200):
                bridge.annotate(i=i, name=f"t{i}")
        except BaseException as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_import_pulls_in_only_the_standard_library(tmp_path: Path) -> None:
    script = """
import json, sys
before = set(sys.modules)
import bridge
lazy = "sdk_side._writer" not in sys.modules
bridge.annotate(tenant_id="acme")
new = set(sys.modules) - before
top = {m.split(".")[0] for m in new}
third = sorted(t for t in top if t not in sys.stdlib_module_names
               and t not in ("bridge", "sdk_side") and not t.startswith("_"))
print(json.dumps({"lazy": lazy, "third": third, "status": bridge.status().noop_calls}))
"""
    env = {"EBPF_BRIDGE_PIN_DIR": str(tmp_path / "none"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    got = json.loads(out.stdout)
    assert got == {"lazy": True, "third": [], "status": 1}


def test_noagent_retries_at_most_once_per_second(no_agent: Path) -> None:
    # After a failed open the next check is scheduled a full interval later.
    assert _writer._P.next_check > 0
    bridge.annotate(a=1)
    scheduled = _writer._P.next_check
    for _ in range(100):
        bridge.annotate(a=1)
    assert _writer._P.next_check == scheduled


def test_current_span_context_without_an_agent_is_none(no_agent: Path) -> None:
    assert bridge.current_span_context() is None
    assert bridge.current_span_context("00-" + "ab" * 16 + "-" + "cd" * 8 + "-01") is None
