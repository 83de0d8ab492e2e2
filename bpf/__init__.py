"""The agent's kernel programs, shipped as package data and compiled by BCC at agent start."""

from __future__ import annotations

from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
"""Directory holding ``agent.bpf.c`` and ``bridge_abi.h``."""
