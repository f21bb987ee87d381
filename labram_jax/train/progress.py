"""Live progress of a training run for the person watching it: a bar on a terminal, plain lines in a log.

On a terminal (stderr is a TTY) a tqdm bar, redrawn as the steps finish, shows step/total, the last logged loss,
samples/s and the ETA. Anywhere else (CI, SLURM logs, a pipe) the same fields go out as one plain line per logged
step (train.log_every), since a bar's carriage returns make a log file unreadable. Validation and test results are
one line in both. It goes to stderr, so that stdout stays the run's result (the launcher's JSON summary). Only
process 0 shows anything.

The rate and ETA count from the first step of this session on: the first step's time is mostly compilation, and a
resumed run has not trained the steps before it.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

import jax
from tqdm import tqdm


class Progress:
    """A Tracker (labram_jax.train.logger) of the logged records that also advances with every step."""

    def __init__(self, total: int, start: int, batch_size: float, *, enabled: bool = True,
                 stream: TextIO | None = None):
        # batch_size: windows a step, until the logged records say how many a step has seen (packing)
        self.total, self.batch_size, self.stream = total, batch_size, stream or sys.stderr
        self.enabled = enabled and jax.process_index() == 0
        self.step, self.loss = start, None
        self.began = time.perf_counter()
        self.now = self.began
        self.first: tuple[int, float] | None = None  # (step, time) of this session's first finished step
        self.bar = None
        if self.enabled and self.stream.isatty():
            self.bar = tqdm(total=total, initial=start, file=self.stream, desc="train", dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def advance(self, step: int) -> None:
        if not self.enabled:
            return
        self.step, self.now = step, time.perf_counter()
        if self.first is None:
            self.first = (step, self.now)
        if self.bar is not None:
            self.bar.set_postfix_str(self._status(), refresh=False)
            self.bar.update(step - self.bar.n)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled or not metrics:
            return
        if "loss" in metrics:  # a training record (evaluations name their split: "val/loss")
            self.loss = metrics["loss"]
            if metrics.get("windows_seen"):  # a packed batch row holds several windows: count the real ones
                self.batch_size = metrics["windows_seen"] / step
            if self.bar is not None:
                self.bar.set_postfix_str(self._status())
            else:
                self._line(f"step {step}/{self.total} ({100 * step // self.total}%): "
                           + self._status(elapsed=True))
            return
        self._line(f"step {step}/{self.total}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                              if not k.endswith("_seen")))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _rate(self) -> float | None:
        """Steps per second since this session's first step."""
        if self.first is None or self.step == self.first[0] or self.now == self.first[1]:
            return None
        return (self.step - self.first[0]) / (self.now - self.first[1])

    def _status(self, elapsed: bool = False) -> str:
        """The loss (one fixed format), samples/s and ETA, each once it is known; with the time since the start for
        plain lines (a bar shows its own)."""
        rate = self._rate()
        parts = [] if self.loss is None else [f"loss {self.loss:.4f}"]
        if rate is not None:
            parts.append(f"{rate * self.batch_size:.1f} samples/s")
        if elapsed:
            parts.append(f"elapsed {tqdm.format_interval(self.now - self.began)}")
        if rate is not None:
            parts.append(f"eta {tqdm.format_interval((self.total - self.step) / rate)}")
        return ", ".join(parts) or "compiling"

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)
