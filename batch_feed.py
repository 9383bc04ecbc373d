"""Training batches drawn in a forked child process while this one trains (multiple_task).

Drawing a CPU preset batch (4 rules x 8 trials, numpy) takes ~2.2 ms of a ~22 ms step, on
the Python side, while a core sits idle through the step's serial parts (loss, optimiser,
the small ops around the kernel). A child process draws the next batch meanwhile, so the
step no longer waits for it (7 Dec, 2 idle cores: 17% more steps per second in
benchmarks/bench_train_step.py, 10% over the preset's whole run, whose adaptive sampling
favours long trials; under load the same or more, benchmarks/bench_contention.py). A thread
cannot do this: it holds the interpreter lock while it draws (tried: slower).

The batches are the ones the loop would draw itself, in the same order, from the same
generator: the rule weights p change only at an evaluation, so the training loop plans a
*stretch* (the steps up to the next evaluation, all drawn with one p) and the child receives
p, the stretch's length and the generator's state, and sends back each batch with the
generator's state after it. The parent's generator takes that state as it takes each batch,
so a checkpoint saved at any step holds exactly the state an inline run would hold, and
results are bit-identical with and without the child (tests/test_training.py).

Nothing but numbers crosses the pipe: a JSON header (the generator's state, the arrays'
names, dtypes and shapes) and the arrays' bytes; nothing is pickled. If the child stops (it
is killed, its pipe breaks, or drawing fails there), the parent says so once and draws the
rest itself from the state of the last batch it received: a lost child costs time, never
results, and an error in drawing is raised here, where the same draw fails again. The child
dies with this process (forked_jobs.fork_child) and does not keep its run folder
locked (run_folder closes a forked child's copies of the lock). The child runs
only where forking is safe (Linux, no CUDA in use: forked_jobs.fork_safe); elsewhere, or
with prefetch = False, the loop draws every batch itself through the same interface.

Example:
    feed = BatchFeed(lambda p, rng: training_batch(cfg, rules, p, rng), rng, forked=True)
    feed.plan(p, n_steps)           # the next n_steps batches are drawn with p
    batch = feed.next()             # .inputs .targets .mask .rule .length, as Batch
    feed.close()
"""
import json
import multiprocessing
import os
import signal
import warnings
from typing import NamedTuple

import numpy as np

import forked_jobs

ALIGN = 8  # bytes: each array starts at a multiple of this in the payload (aligned for any dtype sent)


class Arrays(NamedTuple):
    """The arrays of an mpn_tasks.Batch that training reads (batch_to_torch)."""
    inputs: np.ndarray
    targets: np.ndarray
    mask: np.ndarray
    rule: np.ndarray
    length: np.ndarray


FIELDS = Arrays._fields


class BatchFeed:
    """draw(p, rng) -> a batch, called for every step in order: here (forked=False) or in a
    forked child that keeps one batch ahead of the caller. `plan(p, n)` announces the next
    n batches (all drawn with weights p); `next()` returns the next planned batch and leaves
    `rng` in the state it would have after drawing it here."""

    def __init__(self, draw, rng, forked=True):
        self.draw, self.rng = draw, rng
        self.p, self.left = None, 0
        self.pid = self.conn = None
        if forked and forked_jobs.fork_safe():
            self._fork()

    @property
    def forked(self):
        return self.conn is not None

    def plan(self, p, n):
        """The next n batches are drawn with weights p (n >= 1; the previous plan used up)."""
        if self.left:
            raise RuntimeError(f"{self.left} planned batches are still to be taken")
        self.p, self.left = np.array(p, dtype=np.float64), int(n)
        if self.forked:
            self._send(dict(p=self.p.tolist(), n=self.left, rng=self.rng.bit_generator.state))

    def next(self):
        if self.left <= 0:
            raise RuntimeError("no batch is planned: call plan(p, n) first")
        self.left -= 1
        if self.forked:
            try:
                return self._receive()
            except (EOFError, OSError) as err:
                self._lose(err)
        return self.draw(self.p, self.rng)

    def close(self):
        """Stops the child (it may be drawing batches that will not be taken)."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.pid is not None:
            forked_jobs.stop_child(self.pid)
            self.pid = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --------------------------------------------------------------------------------
    # The parent's side of the pipe

    def _fork(self):
        here, there = multiprocessing.Pipe()
        pid = forked_jobs.fork_child()
        if pid == 0:
            here.close()
            _child(there, self.draw, self.rng)  # never returns
        there.close()
        self.pid, self.conn = pid, here

    def _send(self, message):
        try:
            self.conn.send_bytes(json.dumps(message).encode())
        except OSError as err:
            self._lose(err)

    def _receive(self):
        head = json.loads(self.conn.recv_bytes())
        payload = np.empty(head["nbytes"], np.uint8)  # writable, so torch takes it as is
        self.conn.recv_bytes_into(payload)
        arrays = {name: np.frombuffer(payload, dtype, count=int(np.prod(shape)),
                                      offset=offset).reshape(shape)
                  for name, dtype, shape, offset in head["fields"]}
        self.rng.bit_generator.state = head["rng"]
        return Arrays(**arrays)

    def _lose(self, err):
        """Goes on without the child: the parent's generator holds the state after the last
        batch taken, so drawing here continues the same sequence."""
        warnings.warn(f"the batch process stopped ({err.__class__.__name__} on its pipe); "
                      "drawing training batches in this process from here on (same batches, "
                      "slower)", RuntimeWarning, stacklevel=3)
        self.close()


def _pack(batch, rng):
    """(JSON header, payload) of one batch and the generator's state after it."""
    fields, parts, offset = [], [], 0
    for name in FIELDS:
        a = np.ascontiguousarray(getattr(batch, name))
        fields.append([name, a.dtype.str, list(a.shape), offset])
        pad = -a.nbytes % ALIGN
        parts += [a.tobytes(), bytes(pad)]
        offset += a.nbytes + pad
    head = dict(rng=rng.bit_generator.state, fields=fields, nbytes=offset)
    return json.dumps(head).encode(), b"".join(parts)


def _child(conn, draw, rng):
    """The forked drawer: per plan, n batches from the parent's generator state (rng is this
    process's copy of the parent's generator), each sent with the state after it. It exits
    when the parent closes the pipe or stops it, and on any error, which the parent then
    meets itself when it draws the same batch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    code = 1
    try:
        while True:
            plan = json.loads(conn.recv_bytes())
            p = np.array(plan["p"], dtype=np.float64)
            rng.bit_generator.state = plan["rng"]
            for _ in range(plan["n"]):
                head, payload = _pack(draw(p, rng), rng)
                conn.send_bytes(head)
                conn.send_bytes(payload)
    except (EOFError, OSError):  # the parent closed the pipe: nothing is waiting for batches
        code = 0
    finally:
        os._exit(code)
