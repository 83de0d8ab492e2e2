"""OTLP/JSON lines on disk: the agent's default sink when no OTLP endpoint is configured."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

from kernel_side.export.base import SpanExporter
from kernel_side.export.otlp_json import otlp_json_line
from kernel_side.model import SpanRecord

logger = logging.getLogger(__name__)


class JsonlExporter(SpanExporter):
    """Appends one compact OTLP/JSON ``ExportTraceServiceRequest`` per line to ``path``.

    Same line format as the Collector's file exporter, so the output can be replayed into a
    Collector (``otlpjsonfile`` receiver) or read with ``jq``. Parent directories are created; the
    file is flushed after every batch so a crash loses at most the batch in flight.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._file = self.path.open("ab")

    def export(self, spans: Sequence[SpanRecord]) -> bool:
        """Append ``spans`` as one line; False (logged) on I/O errors or after shutdown."""
        if not spans:
            return True
        # Written directly (otlp_json_line): the bytes orjson writes for to_otlp_json.
        line = otlp_json_line(spans)
        with self._lock:
            if self._file.closed:
                logger.warning("jsonl export to %s after shutdown: %d spans", self.path, len(spans))
                return False
            try:
                self._file.write(line)
                self._file.flush()
            except OSError as exc:
                logger.warning("jsonl export to %s failed: %s", self.path, exc)
                return False
        return True

    def shutdown(self) -> None:
        """Close the file; idempotent."""
        with self._lock:
            self._file.close()
