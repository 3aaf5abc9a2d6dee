"""Spawned worker processes for a study's jobs, sharing this process's torch threads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def workers_for(processes: int, device: str) -> int:
    """``processes``, else one per core torch uses, up to 4 (1 on a GPU).

    A study's small models gain more from a second process than from a second thread. Results
    depend on the torch threads of the process that makes them, as any CPU run's do: each worker
    has this process's threads / workers of them.
    """
    if processes:
        return processes
    from diffinv.device import resolve_device

    if resolve_device(device).type != "cpu":
        return 1
    return max(1, min(4, _cores()))


def process_pool(workers: int) -> Any:
    """``workers`` fresh (spawned) processes sharing this process's torch threads (at least one each)."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, _cores() // workers)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
                               initargs=(threads, os.getpid()))
    for _ in range(workers):  # start them all now (the pool starts one per waiting job): their imports take seconds
        pool.submit(int)
    return pool


def run_all(pool: Any, fn: Callable[..., Any], jobs: list[tuple]) -> list[Any]:
    """``fn(*job)`` for every job on ``pool``, results in job order; the first failure cancels the jobs not
    started and is raised here. Finished units are on disk already (all writes are atomic)."""
    from concurrent.futures import FIRST_EXCEPTION, wait

    futures = [pool.submit(fn, *job) for job in jobs]
    done, _ = wait(futures, return_when=FIRST_EXCEPTION)
    failed = [f for f in done if f.exception() is not None]
    if failed:
        for f in futures:
            f.cancel()
        raise failed[0].exception() or RuntimeError("a job failed")
    return [f.result() for f in futures]


def _cores() -> int:
    # torch's own thread count (cores it may use; OMP_NUM_THREADS), not os.cpu_count(): in a container that is the
    # host's, and 4 workers x 16 threads on a 2-core quota would thrash.
    import torch

    return torch.get_num_threads()


def _start_worker(threads: int, parent: int) -> None:
    import importlib

    import torch

    die_with(parent)
    torch.set_num_threads(threads)
    for stage in ("generate", "invert", "train"):  # what every job needs, imported before the first one arrives
        importlib.import_module(f"diffinv.stages.{stage}")


def die_with(parent: int, every: float = 1.0) -> None:
    """End this process when ``parent`` ends, even by ``kill -9`` (which runs no clean-up in the parent): on Linux
    the kernel sends SIGKILL at once (PR_SET_PDEATHSIG); everywhere a thread checks every ``every`` seconds."""
    import os
    import signal
    import sys
    import threading
    import time

    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent ended before the line above took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)  # an orphan: its results would go to no one

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()
