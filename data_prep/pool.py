"""The crash-safe process pool of the corpus engine: a function over items in worker processes, results in input
order, surviving workers that die (a segfault in a file reader, the kernel's OOM killer) and a parent that dies."""
from __future__ import annotations

import collections
import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator, TypeVar

from labram_jax.preemption import ignore_in_worker

T = TypeVar("T")
R = TypeVar("R")
_END = object()


def _follow(parent: int) -> None:
    """Worker initializer: leave SIGTERM and SIGINT to the job process, and exit when it is gone. A pool worker
    blocks on its task queue forever once its parent is killed (it holds both ends of the queue's pipe, so it
    never sees EOF), and through it keeps the fork server alive too."""
    ignore_in_worker()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(parent, 0)
            except (ProcessLookupError, PermissionError):  # gone, or its pid already reused by someone else
                os._exit(1)

    threading.Thread(target=watch, name="follow-parent", daemon=True).start()


def _pool(workers: int, context: Any) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_follow, initargs=(os.getpid(),))


def _result(future: Future, poll: Callable[[], None]) -> Any:
    """future.result(), calling poll() about four times a second while it waits."""
    while True:
        try:
            return future.result(timeout=0.25)
        except TimeoutError:
            poll()


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, on_crash: Callable[[T, str], R],
                preload: tuple[str, ...] = (), poll: Callable[[], None] = lambda: None) -> Iterator[R]:
    """fn over items in `workers` processes, yielded in input order, with at most 2 x workers items in flight.

    `poll` is called before each item is submitted and while a result is awaited, and may raise to abandon the
    work (a stop signal). Abandoned (poll raised, or the caller closed the iterator), the workers are killed at
    once, whatever they are blocked on (a file that never answers): the items they held are done again by a rerun.

    A worker process that dies (a segfault in a file reader, the kernel's OOM killer) breaks the whole pool and
    every item in flight with it; the item at the head is then retried alone in a fresh process, which tells a
    culprit (it dies again: on_crash(item, reason) stands in for its result) from a bystander; the other items
    keep the results they had or run again in a new pool. Processes come from a fork server, which imports fn's
    module and `preload` once: forking this process directly would copy the shard writer's threads and JAX state,
    and spawning would import everything again in every worker.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["data_prep.forkserver_signals", fn.__module__, *preload])
    items = iter(items)
    pending: collections.deque[tuple[T, Future]] = collections.deque()
    executor = _pool(workers, context)

    def submit(item: T) -> Future:
        try:
            return executor.submit(fn, item)
        except BrokenProcessPool as error:  # a worker died since the last result: handled when item is the head
            future: Future = Future()
            future.set_exception(error)
            return future

    finished = False
    try:
        while True:
            while len(pending) < 2 * workers and (item := next(items, _END)) is not _END:
                poll()
                pending.append((item, submit(item)))
            if not pending:
                finished = True
                return
            item, future = pending.popleft()
            try:
                result = _result(future, poll)
            except BrokenProcessPool:
                _kill_survivors(executor)
                executor.shutdown(wait=True, cancel_futures=True)
                result = _alone(fn, item, context, on_crash)
                others = list(pending)
                pending.clear()
                executor = _pool(workers, context)
                # Results that were in before the pool broke stand; the rest run again.
                pending.extend((other, done if _succeeded(done) else submit(other)) for other, done in others)
            yield result
    finally:
        if not finished:  # a worker blocked for good would hold the interpreter's exit, which joins the pool
            _kill_survivors(executor)
        executor.shutdown(wait=False, cancel_futures=True)


def _kill_survivors(executor: ProcessPoolExecutor) -> None:
    """SIGKILL the workers a broken or abandoned pool still has. The executor ends them with SIGTERM and then joins
    them, but workers ignore SIGTERM (ignore_in_worker), and one blocked writing a large result into the pipe that
    nobody reads any more, or on a file that never answers, would never exit: the join, and with it the whole job,
    would hang."""
    for process in list((executor._processes or {}).values()):  # the executor offers no public handle
        process.kill()


def _succeeded(future: Future) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def _alone(fn: Callable[[T], R], item: T, context: Any, on_crash: Callable[[T, str], R]) -> R:
    with _pool(1, context) as single:
        try:
            return single.submit(fn, item).result()
        except BrokenProcessPool:
            return on_crash(item, "the preprocessing process died (a crash in the file reader, or killed for "
                                  "using too much memory)")
