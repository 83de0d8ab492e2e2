"""Type stub for the optional C accelerator (sdk_side/_fastbpf.c)."""

from collections.abc import Callable
from typing import Any

def update(attr: object, /) -> int: ...
def delete(attr: object, /) -> int: ...
def configure(
    *,
    abi_version: int,
    data_off: int,
    sdk_off: int,
    sdk_size: int,
    value_size: int,
    max_attrs: int,
    attr_bytes: int,
    f_truncated: int,
    f_sdk_span: int,
    cells: int,
    cell_bits: int,
    cell_size: int,
    cell_value_off: int,
    cell_hash: int,
) -> None: ...

class Slot:
    mirror: dict[str, bytes]
    data: bytes
    sdk: bytes
    sdk_in_buf: bytes
    trunc: bool
    synced: bool
    stale: bool
    port: int
    req_calls: int
    req_len: int
    filled: int
    gen: int
    def bind(self, value: bytearray, exist: object, noexist: object, any_: object, /) -> None: ...

def annotate(
    slot: Slot,
    attrs: dict[str, str | int | float | bool],
    strs: dict[str, dict[object, bytes]],
    /,
) -> int: ...

class Entry:
    def __init__(
        self, declined: Callable[..., None], tried: Callable[..., None], /
    ) -> None: ...
    def __call__(self, **attrs: str | int | float | bool) -> None: ...

def setup(
    *,
    tls: object,
    ctxvar: object,
    modules: dict[str, Any],
    strs: dict[str, dict[object, bytes]],
    max_str_len: int,
    per_key_max: int,
    attr_str: int,
) -> None: ...
def gate(open: bool, deadline: float, gen: int, /) -> None: ...
def handled_calls() -> int: ...
def map_cells(tid_fd: int, cells_fd: int, /) -> None: ...
def cell_stats() -> tuple[bool, int, int]: ...
def release_cell(attr: object, /) -> bool: ...
