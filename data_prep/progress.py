"""The progress line of `labram prep` and `labram build`: recordings done of the total, hours of EEG written,
throughput and the time left, on one updating stderr line (a plain line every 30 s when stderr is not a terminal),
and each rejection on a line of its own."""
from __future__ import annotations

import time
from typing import Any, TextIO

_PLAIN_EVERY_S = 30.0


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
    """`total` recordings of which `done` were done before this run; None as the stream shows nothing."""

    def __init__(self, stream: TextIO | None, total: int, done: int, job: str = "prep") -> None:
        self.stream, self.total, self.done, self.job = stream, total, done, job
        self.tty = bool(stream) and hasattr(stream, "isatty") and stream.isatty()
        self.before = done  # the time left is estimated from this run's pace only
        self.hours = 0.0
        self.rejected = 0
        self.drawn = False
        self.start = self.last = time.monotonic()

    def resumed(self, done: int) -> None:
        """`done` more recordings were done by an earlier run."""
        self.done += done
        self.before += done

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.hours / (elapsed / 60) if elapsed > 0 else 0.0
        now = self.done - self.before
        eta = _duration(elapsed / now * (self.total - self.done)) if now else "?"
        return (f"{self.job} {self.done}/{self.total} recordings | {self.hours:.2f} h of EEG written | "
                f"{rate:.2f} h/min | {self.rejected} rejected | ETA {eta}")

    def update(self, entry: dict[str, Any]) -> None:
        """One recording's report entry is in."""
        self.done += 1
        self.hours += entry["hours"] if entry["status"] == "written" else 0.0
        if entry["status"] == "rejected":
            self.rejected += 1
            self.note(f"rejected {entry['path']}: {entry['reason']}")
        now = time.monotonic()
        if self.stream and self.tty and (now - self.last > 0.1 or self.done == self.total):
            self.stream.write("\r\033[K" + self.line())
            self.stream.flush()
            self.last, self.drawn = now, True
        elif self.stream and not self.tty and now - self.last > _PLAIN_EVERY_S:
            print(self.line(), file=self.stream, flush=True)
            self.last = now

    def note(self, text: str) -> None:
        if self.stream:
            print(("\r\033[K" if self.tty else "") + text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.stream and self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False
