"""Where records go. One record per image: a result or an error; whole lines, flushed per batch."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import IO, Iterable


class SinkError(OSError):
    """The output cannot be opened or written; the CLI reports it as a usage error."""


class JsonlSink:
    """JSON Lines: one object per line, UTF-8. ``-`` writes to standard output."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._stream: IO[str]
        if self.path == "-":
            self._stream = sys.stdout
            self._owned = False
        else:
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                self._stream = open(self.path, "w", encoding="utf-8")
            except OSError as exc:
                raise SinkError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
            self._owned = True

    def write(self, records: Iterable[dict]) -> None:
        # One write call per batch, then flush: a crash leaves whole batches on disk.
        text = "".join(json.dumps(record, separators=(",", ":")) + "\n" for record in records)
        if text:
            self._stream.write(text)
            self._stream.flush()

    def close(self) -> None:
        if self._owned:
            self._stream.close()
        else:
            self._stream.flush()

    def __enter__(self) -> "JsonlSink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
