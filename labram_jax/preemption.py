"""Stopping when told to: SIGTERM or SIGINT ends a job at its next safe point, after its work is saved.

Preemptible machines (spot instances, TPU VMs, Kubernetes, SLURM with `--signal`) send SIGTERM and kill some
seconds later. A job runs inside `StopSignals()`: a signal only sets a flag, and the job looks at the flag where
stopping loses nothing (training: a step boundary; `labram prep` and `labram build`: a recording boundary). It
saves, then raises Preempted, which the command lines turn into exit status EXIT_CODE. Signals after the first are
reported and otherwise ignored, so a second Ctrl-C cannot cut a save in half (SIGKILL can; Orbax's temporary
folders and prep's `.tmp` shards then leave the previous state intact).

Multi-host training must stop every process at the same step, since all of them write each checkpoint.
`StopAgreement` OR-reduces the processes' flags with a one-byte collective at every step boundary and answers
with the result of the previous boundary: reading it waits for the step before, never the one just dispatched,
so the device queue stays one step ahead and a stop costs one more step. JAX's own preemption service
(`multihost_utils.reached_preemption_sync_point`) works here with Gloo too, but it hears SIGTERM through a C++
handler that any Python handler replaces, and it never hears SIGINT; one mechanism serves both signals on every
backend.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import jax

# JAX is imported by StopAgreement only: corpus jobs and their worker processes use the signals and never start it.

# EX_TEMPFAIL of sysexits.h, "try again later": rerunning the same command resumes the job.
EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """A job stopped by a signal after saving its work; the message names what was saved."""


def _say(text: str) -> None:
    # os.write, not print: the handler may interrupt a print to stderr, and a buffered stream refuses re-entry.
    os.write(2, (text + "\n").encode())


_ACTIVE: list["StopSignals"] = []  # entered and not yet exited, outermost first


class StopSignals:
    """While entered, SIGTERM and SIGINT set `received` (the first signal's name) instead of ending the process.

    Handlers can only be set from the main thread; entered from another thread this does nothing, and the
    process keeps its usual handlers. Nested (a study or a grid around the trainer), an inner one starts with a
    signal the outer ones have received (say, during the compilation before training), so that the trainer
    stops at its first safe point instead of training on; and a signal the inner one receives reaches the outer
    ones as it exits.
    """

    def __init__(self, job: str) -> None:
        self.job = job
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
            self.received = self.received or next((s.received for s in _ACTIVE if s.received), None)
            _ACTIVE.append(self)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for number, handler in self._previous.items():
            # None: a handler set outside Python (jax.distributed's preemption notifier); it cannot be put back.
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
        if self in _ACTIVE:
            _ACTIVE.remove(self)
            for outer in _ACTIVE:
                outer.received = outer.received or self.received

    def _handle(self, number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        if self.received is None:
            self.received = name
            _say(f"{name}: {self.job} stops at its next safe point and saves its work first")
        else:
            _say(f"{name}: already stopping after {self.received}; the save in progress finishes first")


def ignore_in_worker(*_: object) -> None:
    """Pool and loader worker initializer (any arguments, such as grain's worker index and count, are ignored):
    stopping is the job process's decision. A Ctrl-C reaches the whole process group (and some schedulers signal
    every process), and a worker that died of it would be taken for a crash. A worker started under `held` gets
    the signals held until now; one that came meanwhile is dropped here."""
    for number in SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """SIGTERM and SIGINT held (pending, not lost) in the calling thread, and in the threads and processes it
    starts meanwhile, which keep them held from their start: a worker process cannot die of a group signal during
    its start-up, before its initializer (ignore_in_worker) ignores it. This process still hears them: the kernel
    hands a held signal to another of its threads, or to this one as the hold ends, and Python runs the handler
    in the main thread."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


class StopAgreement:
    """Whether a training run stops at this step boundary: the same answer on every process, True once any of
    them received a signal. Called once per step boundary, in the same sequence on every process."""

    def __init__(self, signals: StopSignals) -> None:
        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        self.signals = signals
        self._pending: jax.Array | None = None
        self._processes = jax.process_count()
        if self._processes > 1:
            devices = [min((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
                       for p in range(self._processes)]
            self._mine = next(d for d in devices if d.process_index == jax.process_index())
            self._flags = NamedSharding(Mesh(np.array(devices), ("process",)), PartitionSpec("process"))
            self._any = jax.jit(jnp.any, out_shardings=NamedSharding(self._flags.mesh, PartitionSpec()))

    def _dispatch(self) -> jax.Array:
        import jax
        import numpy as np

        flag = jax.device_put(np.array([self.signals.requested]), self._mine)
        return self._any(jax.make_array_from_single_device_arrays((self._processes,), self._flags, [flag]))

    def __call__(self, final: bool = False) -> bool:
        """final=True: the last call of the run, which also waits for this boundary's answer."""
        if self._processes == 1:
            return self.signals.requested
        current, previous = self._dispatch(), self._pending
        self._pending = current
        answers = [a for a in (previous, current if final else None) if a is not None]
        return any(bool(a.addressable_data(0)) for a in answers)
