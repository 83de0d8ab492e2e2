"""Suite-wide policy: under the README's test command a skipped test is a failure.

scripts/test.sh installs every server, tool and package the suite uses, so a test that skips
there hides a missing install step (a protocol's whole coverage could go quietly green).
It sets EBPF_BRIDGE_REQUIRE_ALL=1; plain ``pytest`` keeps ordinary skips for developers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

REQUIRE_ALL = "EBPF_BRIDGE_REQUIRE_ALL"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Turn a skip into a failure that names the reason, when every dependency must exist."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get(REQUIRE_ALL) != "1" or not report.skipped or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    report.outcome = "failed"
    report.longrepr = (
        f"skipped, but {REQUIRE_ALL}=1 (scripts/test.sh) requires every test to run: {reason}. "
        "Install what it names (scripts/install.sh does), or run pytest directly to allow skips."
    )
