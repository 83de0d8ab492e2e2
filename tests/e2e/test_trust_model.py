"""The context map's trust model, with real unprivileged users: the agent started with
``--app-group G`` pins its context maps so that members of G can write context (write-only
opens) but not read it, and users outside G can do neither. Users and the group are created
for the test and removed after it; the pins live in a private directory."""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from bridge import _abi
from kernel_side.otlp_receiver import OtlpReceiver
from tests.e2e.conftest import APPS, PYTHON, REPO, SERVER, Harness, by_service

APP = APPS / "bridge_status_app.py"

PROBE = """
import json, sys
from sdk_side import _bpf
out = {}
for name, flag in (("rdonly", _bpf.BPF_F_RDONLY), ("rdwr", _bpf.BPF_F_RDWR),
                   ("wronly", _bpf.BPF_F_WRONLY)):
    try:
        _bpf.obj_get(sys.argv[1], flag)
        out[name] = 0
    except OSError as e:
        out[name] = e.errno
print(json.dumps(out))
"""


@pytest.fixture
def users() -> Iterator[dict[str, int | str]]:
    """A group G, a member user and an outsider user; removed afterwards."""
    tag = secrets.token_hex(3)
    group, member, outsider = f"ebbg{tag}", f"ebbm{tag}", f"ebbo{tag}"
    subprocess.run(["groupadd", "--system", group], check=True)
    try:
        subprocess.run(["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin",
                        "-G", group, member], check=True)
        subprocess.run(["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin",
                        outsider], check=True)
        import grp
        import pwd

        yield {"group": group, "gid": grp.getgrnam(group).gr_gid,
               "member_uid": pwd.getpwnam(member).pw_uid,
               "member_gid": pwd.getpwnam(member).pw_gid,
               "outsider_uid": pwd.getpwnam(outsider).pw_uid,
               "outsider_gid": pwd.getpwnam(outsider).pw_gid}
    finally:
        for u in (member, outsider):
            subprocess.run(["userdel", u], check=False, capture_output=True)
        subprocess.run(["groupdel", group], check=False, capture_output=True)


def _as(uid: int, gid: int, groups: list[int]) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}",
            "--groups=" + ",".join(str(g) for g in groups) if groups else "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all"]


def _probe(prefix: list[str], pin: str) -> dict[str, int]:
    out = subprocess.run([*prefix, PYTHON, "-c", PROBE, pin], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
                         timeout=30)
    assert out.returncode == 0, out.stderr
    result: dict[str, int] = json.loads(out.stdout)
    return result


def test_app_group_members_write_but_never_read(harness: Harness, receiver: OtlpReceiver,
                                                users: dict[str, int | str]) -> None:
    pin_dir = f"/sys/fs/bpf/ebb-trust-{secrets.token_hex(3)}/v{_abi.ABI_VERSION}"
    shared = Path(tempfile.mkdtemp(prefix="ebb-trust-"))
    shared.chmod(0o1777)
    env = {"EBPF_BRIDGE_PIN_DIR": pin_dir, "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": str(REPO)}
    gid, uid_m, uid_o = int(users["gid"]), int(users["member_uid"]), int(users["outsider_uid"])
    member = _as(uid_m, int(users["member_gid"]), [gid])
    outsider = _as(uid_o, int(users["outsider_gid"]), [])
    try:
        agent = harness.agent("--app-group", str(users["group"]), receiver=receiver,
                              env={"EBPF_BRIDGE_PIN_DIR": pin_dir})
        pin = f"{pin_dir}/{_abi.CTX_BY_TID_NAME}"
        st = os.stat(pin)
        assert stat.S_IMODE(st.st_mode) == 0o620 and st.st_gid == gid and st.st_uid == 0
        # Every pinned context map: never readable by anyone but root. The two maps of the
        # other direction (which server span a thread serves, the id salt) hold no context:
        # the group reads them, nobody else, and nobody but root writes them.
        readable = {_abi.SERVER_BY_TID_NAME, _abi.ID_SALT_NAME}
        for p in Path(pin_dir).iterdir():
            mode = stat.S_IMODE(p.stat().st_mode)
            if p.name in readable:
                assert mode == 0o640 and p.stat().st_gid == gid, f"{p}: {oct(mode)}"
            else:
                assert not mode & (stat.S_IRGRP | stat.S_IROTH), f"{p} is readable: {oct(mode)}"
        assert {p.name for p in Path(pin_dir).iterdir()} == {
            _abi.CTX_BY_TID_NAME, _abi.CTX_BY_CONN_NAME, _abi.CTX_CELLS_NAME, *readable}
        # The memory cells need a read-write fd to map: root only, whatever the group.
        cells_pin = f"{pin_dir}/{_abi.CTX_CELLS_NAME}"
        st_c = os.stat(cells_pin)
        assert stat.S_IMODE(st_c.st_mode) == 0o600 and st_c.st_uid == 0
        for who in (member, outsider):
            assert _probe(who, cells_pin) == {"rdonly": errno.EACCES, "rdwr": errno.EACCES,
                                              "wronly": errno.EACCES}
        spans_pin = f"{pin_dir}/{_abi.SERVER_BY_TID_NAME}"
        assert _probe(member, spans_pin) == {"rdonly": 0, "rdwr": errno.EACCES,
                                             "wronly": errno.EACCES}
        assert _probe(outsider, spans_pin) == {"rdonly": errno.EACCES, "rdwr": errno.EACCES,
                                               "wronly": errno.EACCES}

        # The kernel enforces the file mode on BPF_OBJ_GET.
        assert _probe(member, pin) == {"rdonly": errno.EACCES, "rdwr": errno.EACCES,
                                       "wronly": 0}
        assert _probe(outsider, pin) == {"rdonly": errno.EACCES, "rdwr": errno.EACCES,
                                         "wronly": errno.EACCES}

        apps = {}
        for name, prefix in (("app-member", member), ("app-outsider", outsider)):
            ready = shared / f"{name}.ready"
            proc = harness.start(name, [*prefix, PYTHON, str(APP), "--port", "0",
                                        "--ready-file", str(ready)],
                                 env={**env, "OTEL_SERVICE_NAME": name}, ready_file=ready)
            apps[name] = (proc, int(ready.read_text()))
        tag = secrets.token_hex(3)
        for name, (_proc, port) in apps.items():
            for i in range(5):
                r = requests.get(f"http://127.0.0.1:{port}/t/{i}",
                                 headers={"X-Tenant-ID": f"{name}-{tag}-{i}",
                                          "Connection": "close"}, timeout=10)
                assert r.status_code == 200
        # The agent selected every process (no selector): both apps' spans arrive.
        spans = receiver.wait_for(
            lambda ss: all(len([s for s in by_service(ss, n, SERVER)
                                if str(s.attributes.get("url.path")).startswith("/t/")]) >= 5
                           for n in apps), timeout_s=30)
        mem = [s for s in by_service(spans, "app-member", SERVER)
               if str(s.attributes.get("url.path")).startswith("/t/")]
        out = [s for s in by_service(spans, "app-outsider", SERVER)
               if str(s.attributes.get("url.path")).startswith("/t/")]
        assert sorted(str(s.attributes.get("tenant_id")) for s in mem) == [
            f"app-member-{tag}-{i}" for i in range(5)]
        assert not any("tenant_id" in s.attributes for s in out)
        st_m = requests.get(f"http://127.0.0.1:{apps['app-member'][1]}/bridge-status",
                            timeout=10).json()
        st_o = requests.get(f"http://127.0.0.1:{apps['app-outsider'][1]}/bridge-status",
                            timeout=10).json()
        assert st_m["connected"] and st_m["writes"] >= 5 and st_m["annotate_exceptions"] == 0
        # The member writes through its write-only map fd, never through the cells.
        assert st_m["cells"] is False, st_m
        assert "Permission denied" in str(st_m["cells_note"]), st_m
        assert not st_o["connected"] and st_o["noop_calls"] >= 5, st_o
        assert st_o["annotate_exceptions"] == 0
        assert agent.stop() == 0
        print(f"\ntrust: member {st_m}\noutsider {st_o}")
    finally:
        harness.stop_all()
        shutil.rmtree(shared, ignore_errors=True)
        root = Path(pin_dir).parent
        for _ in range(50):
            try:
                if root.exists():
                    shutil.rmtree(root)
                break
            except OSError:
                time.sleep(0.1)
