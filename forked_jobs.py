"""Independent jobs shared among forked processes on one machine, results in shared memory.

For work whose Python side holds the interpreter lock (building inputs, scoring outputs), so
that threads cannot overlap it with compiled code; lesion_engine's conditions are the first
user. The children inherit everything the jobs need (the network, the test set, the job list)
when they are forked, take job numbers one at a time from a shared counter, and write their
results into memory made with `shared_array` before the fork, so nothing is pickled or sent
between processes and the results are the same numbers in any number of processes.

Forking is safe only on Linux (macOS frameworks and Windows have no safe fork) and where the
parent holds no CUDA context; elsewhere `process_count` gives 1 and one process runs all.
A child dies with the parent that forked it (`die_with_parent`), so a stage killed with
kill -9 leaves no worker running its jobs for nobody, and it closes its copies of the run
folder locks the parent holds (run_folder), so the folder is free at once.

Example:
    out = shared_array(n, np.float64)
    run_jobs([(1, functools.partial(fill, out, j)) for j in range(n)], process_count(0))
"""
import gc
import mmap
import multiprocessing
import os
import signal
import sys
import time
import traceback

import numpy as np
import torch


def fork_safe(cuda=False):
    """Whether this process may fork workers: on Linux, for work that uses no CUDA."""
    return not cuda and sys.platform.startswith("linux") and hasattr(os, "fork")


def process_count(processes, cuda=False):
    """`processes`, where 0 means one per core this process may run on; 1 for CUDA work and
    where fork is unavailable or unsafe (off Linux)."""
    if not fork_safe(cuda):
        return 1
    if not processes:
        processes = len(os.sched_getaffinity(0))
    return max(1, int(processes))


def shared_array(shape, dtype):
    """An uninitialised array in anonymous shared memory: a process forked after this call
    writes into the same pages (mmap's default MAP_SHARED), unlike ordinary copy-on-write
    memory."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape))
    buffer = mmap.mmap(-1, max(1, count * dtype.itemsize))
    return np.frombuffer(buffer, dtype, count=count).reshape(shape)


def run_jobs(jobs, processes, bar=None):
    """Runs every job of jobs [(weight, fn)] once: fn() here or in one of processes - 1
    forked children; each process takes the next unclaimed job when it finishes one, so long
    and short jobs even out. fn must write its results into shared memory. A job that a child
    claimed but did not finish (it failed or was killed) runs again here, so a lost child
    costs time, never results; a job that fails here raises, and the children are stopped.
    bar (a tqdm bar or None) advances by each finished job's weight."""
    weights = np.array([w for w, _ in jobs])
    forked = processes > 1 and len(jobs) > 1
    finished = shared_array(len(jobs), np.int64) if forked else np.zeros(len(jobs), np.int64)
    finished.fill(0)  # 1 where a job finished
    shown = [0]

    def run(j):
        jobs[j][1]()
        finished[j] = 1
        show()

    def show():
        total = int(weights[finished == 1].sum())
        if bar is not None and total > shown[0]:
            bar.update(total - shown[0])
            shown[0] = total

    if not forked:
        for j in range(len(jobs)):
            run(j)
        return
    claim = JobCounter(len(jobs))
    children = []
    try:
        for _ in range(min(processes, len(jobs)) - 1):
            pid = fork_child()
            if pid == 0:
                _child(claim, jobs, finished)  # never returns
            children.append(pid)
        while (j := claim()) is not None:
            run(j)
        failed = _wait(children, show)
    except BaseException:
        for pid in children:
            stop_child(pid)
        raise
    left = np.flatnonzero(finished == 0)
    if left.size:
        why = (f"{failed} worker process(es) stopped before finishing" if failed else
               "a process was killed while it held the job counter")
        print(f"{why}; running the {left.size} unfinished job(s) in this process")
    for j in left:
        run(j)


class JobCounter:
    """Hands out job numbers 0, 1, ..., n - 1 across forked processes, each once (a counter in
    shared memory under a process-shared lock); calling it gives the next one, or None when
    none is left. A holder keeps the lock for a few instructions, so a process that waits
    `timeout` seconds for it saw the holder killed inside them: it gets None too, and the
    parent then runs every unfinished job itself, rather than every process waiting forever."""

    def __init__(self, n, timeout=10.0):
        self.n, self.timeout = n, timeout
        self.next = shared_array(1, np.int64)
        self.next.fill(0)
        self.lock = multiprocessing.get_context("fork").Lock()

    def __call__(self):
        if not self.lock.acquire(timeout=self.timeout):
            return None
        try:
            j = int(self.next[0])
            self.next[0] = j + 1
        finally:
            self.lock.release()
        return j if j < self.n else None


def _child(claim, jobs, finished):
    """A forked worker: claims and runs jobs until none is left, then exits without running
    the parent's exit handlers or flushing its copies of the parent's buffers."""
    code = 1
    try:
        torch.set_num_threads(1)  # torch's OpenMP pool is not fork-safe with more threads
        while (j := claim()) is not None:
            jobs[j][1]()
            finished[j] = 1
        code = 0
    except KeyboardInterrupt:
        pass
    except BaseException:
        print(f"worker process {os.getpid()} failed:", file=sys.stderr)
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(children, show):
    """Waits for every child, calling show() meanwhile; the number that failed."""
    failed, running = 0, list(children)
    while running:
        for pid in list(running):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                running.remove(pid)
                failed += os.waitstatus_to_exitcode(status) != 0
        show()
        if running:
            time.sleep(0.1)
    return failed


def fork_child():
    """os.fork() as every child of this project needs it: 0 in the child, its PID here. The
    parent's buffered output is flushed first (else the child could write it a second time);
    the inherited objects are frozen for the child's garbage collector, which would otherwise
    write to (and so copy) every shared page of them that it visits; and the child dies with
    this process (die_with_parent)."""
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    gc.freeze()
    try:
        pid = os.fork()
    except BaseException:
        gc.unfreeze()
        raise
    if pid == 0:
        die_with_parent(parent)
    else:
        gc.unfreeze()
    return pid


def die_with_parent(parent_pid):
    """In a forked child: asks Linux to send it SIGKILL when its parent dies (prctl
    PR_SET_PDEATHSIG), so a stage killed with kill -9 leaves no worker running its remaining
    jobs for nobody; exits at once if the parent is already gone. Does nothing where prctl
    cannot be reached. Linux sends the signal when the *thread* that forked ends, so fork from
    a thread that outlives the child (run_jobs and BatchFeed wait for theirs)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - whatever fails here, the child must not run on as the parent
        return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def stop_child(pid):
    """Stops a forked child and reaps it (nothing happens if it has already exited)."""
    try:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass
