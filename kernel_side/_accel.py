"""Loading the agent's optional C modules (``kernel_side._fasthttp``, ``_fastwire``,
``_fastjson``): each is used when ``pip install`` built it, unless ``EBPF_BRIDGE_NO_ACCEL`` is
set, the switch the SDK's accelerator also obeys. Callers keep the Python code as the
fallback, so a missing module only costs speed."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

__all__ = ["load"]


def load(name: str) -> ModuleType | None:
    """``kernel_side.<name>`` when it is built and not switched off, else None."""
    if os.environ.get("EBPF_BRIDGE_NO_ACCEL"):
        return None
    try:
        return importlib.import_module(f"kernel_side.{name}")
    except ImportError:
        return None
