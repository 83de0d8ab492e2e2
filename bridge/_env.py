"""Every environment variable ebpf-bridge reads, by name, and the lookups both sides share.

The agent and the application side must agree on where the maps are pinned, so both resolve
the pin directory through ``pin_dir`` rather than reading the environment themselves.
"""

from __future__ import annotations

import os
from typing import Final

from bridge._abi import CTX_BY_TID_NAME, PIN_DIR

EBPF_BRIDGE_PIN_DIR: Final = "EBPF_BRIDGE_PIN_DIR"
"""Overrides the pin directory (default ``bridge._abi.PIN_DIR``); tests point it elsewhere."""


def pin_dir() -> str:
    """The directory the context maps are pinned in, honouring ``EBPF_BRIDGE_PIN_DIR``."""
    return os.environ.get(EBPF_BRIDGE_PIN_DIR) or PIN_DIR


def ctx_by_tid_pin() -> str:
    """The pin path of the per-thread context map ``ctx_by_tid``."""
    return os.path.join(pin_dir(), CTX_BY_TID_NAME)
