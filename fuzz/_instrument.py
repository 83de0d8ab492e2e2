"""``instrumented()``: a context manager that lets atheris instrument the parser modules
imported under it (coverage guidance), or does nothing without atheris."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def instrumented(enabled: bool = True) -> Iterator[None]:
    """Only when ``enabled`` (the target runs as a fuzzer, not imported by the test suite)."""
    if not enabled:
        yield
        return
    try:
        import atheris
    except ImportError:
        yield
        return
    with atheris.instrument_imports(include=["kernel_side"]):
        yield
