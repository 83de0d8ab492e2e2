"""Every environment variable ebpf-bridge reads, by name, and the lookups both sides share.

The agent and the application side must agree on where the maps are pinned, so both resolve
the pin directory through ``pin_dir`` rather than reading the environment themselves.
"""

from __future__ import annotations

import os
from typing import Final

from bridge._abi import CTX_BY_CONN_NAME, CTX_BY_TID_NAME, CTX_CELLS_NAME, PIN_DIR

EBPF_BRIDGE_PIN_DIR: Final = "EBPF_BRIDGE_PIN_DIR"
"""Overrides the pin directory (default ``bridge._abi.PIN_DIR``); tests point it elsewhere."""

EBPF_BRIDGE_HEADERS: Final = "EBPF_BRIDGE_HEADERS"
"""Request headers the framework integrations map to business attributes when the app passes
no ``headers``: ``"X-Tenant-ID=tenant_id,X-User-ID=user_id"``."""

EBPF_BRIDGE_INSTRUMENT: Final = "EBPF_BRIDGE_INSTRUMENT"
"""``opentelemetry-instrument`` loads the ebpf-bridge integrations only when this is true."""


def pin_dir() -> str:
    """The directory the context maps are pinned in, honouring ``EBPF_BRIDGE_PIN_DIR``."""
    return os.environ.get(EBPF_BRIDGE_PIN_DIR) or PIN_DIR


def ctx_by_tid_pin() -> str:
    """The pin path of the per-thread context map ``ctx_by_tid``."""
    return os.path.join(pin_dir(), CTX_BY_TID_NAME)


def ctx_cells_pin() -> str:
    """The pin path of the mmapable per-thread context map ``ctx_cells``."""
    return os.path.join(pin_dir(), CTX_CELLS_NAME)


def ctx_by_conn_pin() -> str:
    """The pin path of the per-connection context map ``ctx_by_conn``."""
    return os.path.join(pin_dir(), CTX_BY_CONN_NAME)


def header_map(raw: str | None = None) -> dict[str, str]:
    """Parse ``EBPF_BRIDGE_HEADERS`` (or ``raw``): header name -> attribute key.

    Entries are ``Header-Name=attribute_key`` separated by commas; blanks and entries without
    ``=`` are ignored. Header names are matched case-insensitively (kept lower-cased here).
    """
    if raw is None:
        raw = os.environ.get(EBPF_BRIDGE_HEADERS, "")
    out: dict[str, str] = {}
    for part in raw.split(","):
        name, sep, attr = part.partition("=")
        name, attr = name.strip(), attr.strip()
        if sep and name and attr:
            out[name.lower()] = attr
    return out
