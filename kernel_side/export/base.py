"""The exporter interface: a small ABC so real transports and test fakes swap cleanly."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from kernel_side.model import SpanRecord


class SpanExporter(ABC):
    """Sends finished spans somewhere; one instance per destination.

    Implementations are called from one thread at a time by :class:`BatchExporter`, but the file
    and console exporters also lock internally so they can be shared.
    """

    @abstractmethod
    def export(self, spans: Sequence[SpanRecord]) -> bool:
        """Send ``spans``; True on success.

        Never raises for network or I/O errors: those are logged and reported as False, so the
        caller decides whether to retry.
        """

    def shutdown(self) -> None:  # noqa: B027 - a no-op default is the point, not an oversight
        """Release connections and files; later ``export`` calls return False."""
