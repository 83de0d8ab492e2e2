"""Readiness files for the e2e test apps, written whole (a temporary file, then a rename), so a
test that polls for the file never reads half of it. The apps run as scripts, with this folder
first on ``sys.path``."""

from __future__ import annotations

from pathlib import Path


def write_ready(path: str, value: object) -> None:
    """Create ``path`` holding ``str(value)`` (usually the port the app listens on)."""
    tmp = Path(path + ".tmp")
    tmp.write_text(str(value))
    tmp.replace(path)
