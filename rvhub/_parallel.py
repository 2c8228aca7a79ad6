"""Chunks computed on worker threads, consumed in order: the streaming commands (extract, apply) use every core
while their outputs stay byte-identical to a one-thread run.

numpy's array loops, ``os.preadv`` and hashlib release the GIL, so a chunk's read and arithmetic on one thread
overlap with another chunk's on a second one. Results come back in the order the tasks were given, whatever
order they finish in, and an error comes out where a one-thread run would have raised it first.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from .errors import InvalidOptionError

T = TypeVar("T")

THREADS_ENV = "RVHUB_THREADS"  # worker threads of extract/apply (default: the CPUs this process may use)
_MAX_THREADS = 8  # the work is memory-bound: more threads only hold more chunks in memory


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worker_threads(requested: int | None = None) -> int:
    """Threads for chunk work: ``requested``, else ``$RVHUB_THREADS``, else every available CPU; at least 1 and
    at most the available CPUs (and 8)."""
    n = requested
    if n is None:
        text = os.environ.get(THREADS_ENV, "").strip()
        if text:
            try:
                n = int(text)
            except ValueError:
                raise InvalidOptionError(THREADS_ENV, text, "use a whole number of threads (1 = no worker threads)") \
                    from None
    if n is not None and n < 1:
        raise InvalidOptionError("threads", n, "use a whole number of threads, at least 1")
    cpus = min(available_cpus(), _MAX_THREADS)
    return cpus if n is None else min(n, cpus)


def ordered_map(tasks: Iterable[Callable[[], T]], threads: int, ahead: int | None = None) -> Generator[T, None, None]:
    """Run ``tasks`` on ``threads`` worker threads, at most ``ahead`` (default 2 per thread) started beyond the
    one the caller waits for; yield their results in the tasks' order. One thread runs each task inline.

    ``tasks`` is pulled lazily, on the caller's thread, so a generator of tasks may keep sequential state. If
    pulling the next task raises, the tasks before it are finished (and their results yielded) first.
    Closing the iterator early cancels what has not started and waits for what has.
    """
    if threads <= 1:
        for task in tasks:
            yield task()
        return
    window = max(1, ahead if ahead is not None else 2 * threads)
    pending: collections.deque[Future[T]] = collections.deque()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="rvhub-chunk")
    it = iter(tasks)
    try:
        while True:
            try:
                task = next(it)
            except StopIteration:
                break
            except BaseException:
                while pending:  # an earlier task's error (or result) comes first, as it would on one thread
                    yield pending.popleft().result()
                raise
            pending.append(pool.submit(task))
            if len(pending) > window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)
