"""Deterministic work counting, for tests that check a parser's work grows linearly.

Wall-clock ratios flake on a busy machine, so :func:`measure` counts work instead, in three
independent units that do not depend on the machine or its load (they can move by a few
counts with the hash seed's set order, and between Python versions):

``lines``
    Python ``line`` events (``sys.settrace``) in every frame the call runs, library code
    included. Catches Python-level quadratic loops: re-parsing from the start, an inner loop
    over what was already seen, a list rebuilt per item.
``calls``
    C-level calls (``c_call`` events from ``sys.setprofile``), plus each counted method call on
    the input (below). Catches a per-item loop of C calls that runs no Python lines of its own.
``scanned``
    Bytes (or characters) that slices, concatenations and methods of the *input* scan or copy.
    The input is passed as a ``bytes``/``str`` subclass whose ``find``, ``index``, ``count``,
    ``in``, ``split``, ``lower``, ``decode``, slicing, ``+`` and friends add what they touch:
    ``find(sub, start, end)`` adds the bytes from ``start`` to the match (or to ``end``), a slice
    adds its length. Results that are ``bytes``/``str`` are counted objects too, so
    ``data = data[n:]``, ``buf = buf + chunk`` and ``data.find(x)`` from 0 in a loop all show
    up here even though each is one line and one C call.

What it cannot see: C code that reads the input without calling one of the methods above:
``re`` matching and searching, ``struct``, ``int.from_bytes``, ``bytes(x)``, ``translate``,
``memoryview`` slices and copies made from them, and buffers the parser builds itself as
``bytearray`` (``+=`` on those is amortized linear; ``ba = ba + x`` would not be counted). A
regex re-run from the start of the input per item shows up only as a linear number of calls,
and a loop stuck inside C code never returns to the tracer (keep a wall-clock hang detector
for those).

The counted input changes no parser's behaviour that the tests rely on: it hashes and compares
equal to the plain value, and ``bytearray += counted`` still extends in place.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any


class WorkBudgetExceeded(BaseException):
    """Raised inside the measured call to stop it once ``unit`` passes its limit. A
    BaseException, so that a parser's ``except Exception`` cannot swallow it."""

    def __init__(self, unit: str) -> None:
        super().__init__(unit)
        self.unit = unit


@dataclass(frozen=True)
class Work:
    """Work done by one measured call (see the module docstring for each unit)."""

    lines: int = 0
    calls: int = 0
    scanned: int = 0


_UNITS = ("lines", "calls", "scanned")


class _Meter:
    def __init__(self, limit: Work) -> None:
        self.lines = self.calls = self.scanned = 0
        self.limit = limit

    def add(self, scanned: int) -> None:
        self.calls += 1
        self.scanned += scanned
        if self.scanned > self.limit.scanned:
            raise WorkBudgetExceeded("scanned")
        if self.calls > self.limit.calls:
            raise WorkBudgetExceeded("calls")

    def work(self) -> Work:
        return Work(self.lines, self.calls, self.scanned)


_active: _Meter | None = None
# Frames of this file (the counting methods) are not the parser's work: they charge it
# explicitly, one call plus what they scanned.
_HERE = __file__


def _wrap(value: Any) -> Any:
    if type(value) is bytes:
        return CountedBytes(value)
    if type(value) is str:
        return CountedStr(value)
    if type(value) in (list, tuple):
        return type(value)(_wrap(v) for v in value)
    return value


def _charge(scanned: int) -> None:
    if _active is not None:
        _active.add(scanned)


def _search(base: type, name: str) -> Callable[..., Any]:
    """find/index/count and the reverse ones: cost is the span actually searched."""
    real = getattr(base, name)
    finder = base.rfind if name.startswith("r") else base.find

    def method(self: Any, sub: Any, start: Any = None, end: Any = None) -> Any:
        s, e, _ = slice(start, end).indices(len(self))
        width = 1 if isinstance(sub, int) else len(sub)
        i = -1 if name == "count" else finder(self, sub, start, end)
        if i < 0:
            _charge(max(e - s, 0))
        elif finder is base.find:
            _charge(i + width - s)
        else:
            _charge(e - i)
        return real(self, sub, start, end)

    method.__name__ = name
    return method


def _whole(base: type, name: str) -> Callable[..., Any]:
    """Methods that may read all of the receiver: cost is its length or the result's, the
    larger (``join`` and ``replace`` can build more than they read)."""
    real = getattr(base, name)

    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = real(self, *args, **kwargs)
        _charge(max(len(self), len(out) if isinstance(out, (bytes, str)) else 0))
        return _wrap(out)

    method.__name__ = name
    return method


def _prefix(base: type, name: str) -> Callable[..., Any]:
    """startswith/endswith: cost is the longest candidate compared."""
    real = getattr(base, name)

    def method(self: Any, prefix: Any, *args: Any) -> Any:
        cands = prefix if isinstance(prefix, tuple) else (prefix,)
        _charge(max((len(c) for c in cands), default=0))
        return real(self, prefix, *args)

    method.__name__ = name
    return method


def _sequence_methods(base: type) -> dict[str, Any]:
    def getitem(self: Any, key: Any) -> Any:
        if type(key) is int:  # O(1); the line that indexes is already counted
            return base.__getitem__(self, key)
        out = base.__getitem__(self, key)
        _charge(len(out))
        return _wrap(out)

    def add(self: Any, other: Any) -> Any:
        out = base.__add__(self, other)
        _charge(len(out))
        return _wrap(out)

    def radd(self: Any, other: Any) -> Any:
        # Only the plain type: `bytearray += counted` must stay an in-place extend.
        if type(other) is not base:
            return NotImplemented
        out = base.__add__(other, self)
        _charge(len(out))
        return _wrap(out)

    def contains(self: Any, sub: Any) -> bool:
        i = base.find(self, sub)
        _charge(len(self) if i < 0 else i + (1 if isinstance(sub, int) else len(sub)))
        return bool(base.__contains__(self, sub))

    methods: dict[str, Any] = {
        "__getitem__": getitem, "__add__": add, "__radd__": radd, "__contains__": contains,
        "__slots__": (),
    }
    for name in ("find", "rfind", "index", "rindex", "count"):
        methods[name] = _search(base, name)
    for name in ("startswith", "endswith"):
        methods[name] = _prefix(base, name)
    for name in ("split", "rsplit", "splitlines", "partition", "rpartition", "strip", "lstrip",
                 "rstrip", "lower", "upper", "replace", "join", "isdigit", "isalnum", "isalpha",
                 "isspace", "isupper", "islower"):
        methods[name] = _whole(base, name)
    methods["decode" if base is bytes else "encode"] = _whole(
        base, "decode" if base is bytes else "encode")
    return methods


CountedBytes: type = type("CountedBytes", (bytes,), {
    **_sequence_methods(bytes), "__doc__": "bytes whose scans and copies are counted."})
CountedStr: type = type("CountedStr", (str,), {
    **_sequence_methods(str), "__doc__": "str whose scans and copies are counted."})


def counted(value: Any) -> Any:
    """``value`` as a counted ``bytes``/``str`` (others unchanged), for :func:`measure`."""
    return _wrap(value)


# Enough for any of these tests' inputs; a runaway loop hits it within seconds, not never.
DEFAULT_LIMIT = Work(lines=3_000_000, calls=3_000_000, scanned=300_000_000)


def measure(fn: Callable[..., object], *args: Any, limit: Work = DEFAULT_LIMIT) -> Work:
    """Run ``fn(*args)`` (``bytes``/``str`` arguments counted) and return the work it did.

    Stops the call with :class:`WorkBudgetExceeded` as soon as any unit passes ``limit``.
    """
    global _active
    meter = _Meter(limit)

    def local(frame: FrameType, event: str, arg: object) -> Any:
        if event == "line":
            meter.lines += 1
            if meter.lines > limit.lines:
                raise WorkBudgetExceeded("lines")
        return local

    def on_call(frame: FrameType, event: str, arg: object) -> Any:
        return None if frame.f_code.co_filename == _HERE else local

    def on_profile(frame: FrameType, event: str, arg: object) -> None:
        if event == "c_call" and frame.f_code.co_filename != _HERE:
            meter.calls += 1
            if meter.calls > limit.calls:
                raise WorkBudgetExceeded("calls")

    wrapped = [counted(a) for a in args]
    old_trace, old_profile = sys.gettrace(), sys.getprofile()
    _active = meter
    sys.setprofile(on_profile)
    sys.settrace(on_call)
    try:
        fn(*wrapped)
    finally:
        sys.settrace(old_trace)
        sys.setprofile(old_profile)
        _active = None
    return meter.work()


def assert_linear(fn: Callable[..., object], make: Callable[[int], Any], n: int,
                  factor: int = 16, slack: int = 64) -> None:
    """``fn`` on ``make(factor * n)`` does at most ``1.25 * factor`` times its work on
    ``make(n)`` (plus ``slack``), in each unit separately: 20x for 16x the input, where
    quadratic work would be 256x. ``make(k)`` returns the argument, or a tuple of arguments,
    for an input of ``k`` units. The larger run is stopped as soon as it passes the bound, so
    a quadratic parser fails fast instead of running long."""

    def args(k: int) -> tuple[Any, ...]:
        a = make(k)
        return a if isinstance(a, tuple) else (a,)

    # Untraced first run: lazily built caches (compiled regexes, memo tables) are not work
    # that grows with the input.
    fn(*[counted(a) for a in args(n)])
    try:
        small = measure(fn, *args(n))
    except WorkBudgetExceeded as e:
        raise AssertionError(f"{n} units of input passed {getattr(DEFAULT_LIMIT, e.unit)} "
                             f"{e.unit}: a runaway loop") from None
    ratio = 1.25 * factor
    bound = Work(*(int(ratio * getattr(small, u)) + slack for u in _UNITS))
    try:
        measure(fn, *args(factor * n), limit=bound)
    except WorkBudgetExceeded as e:
        raise AssertionError(
            f"super-linear work: {factor}x the input ({n} -> {factor * n} units) passed "
            f"{ratio:g}x the {e.unit} of {small} (stopped at {bound})") from None
