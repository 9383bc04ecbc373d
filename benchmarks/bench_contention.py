"""Training speed of the CPU preset under CPU contention: idle, and with 1 and 2 busy competitors.

Trains `configs/cpu_quick.py` for --steps steps in a fresh temporary runs folder, once per
condition, while K competing processes (`python -c "while True: pass"`) each keep one core
busy. Reports training steps/s (from log.json: the steps between the first scheduled
evaluation and the last, evaluations included, so the start-up and the one-time kernel
load are left out), each condition's rate as a fraction of the idle rate, the 1-minute load
average just before each run, the compiled kernel's mean thread count over the evaluation
intervals (`kernel`; chosen per interval when kernel_threads = 0), the final logged accuracies and validation loss, and a hash of
the trained weights: the weights and accuracies must be the same in every run (the kernel's
result does not depend on its threads, and at batch 32 neither do torch's training ops). The
validation loss may differ in the 8th digit between torch thread counts (its sums over 128
trials are split over threads); the closest lr-plateau decision of the preset's run was 1e-3
relative away from flipping, so that never changes the run.

A fair share of 2 cores among 2 training threads and K competitors gives the training
2 / (2 + K) of the machine: ~67% of the idle rate with 1 competitor, 50% with 2.

Reads nothing from the repository's runs; writes only to a temporary folder. Prints a table.

Example:
    python benchmarks/bench_contention.py                  # 2,000 steps per condition
    python benchmarks/bench_contention.py --steps=600 --competitors=0,2
    python benchmarks/bench_contention.py --extra="--num_threads=0" --extra="--num_threads=1"
                       # variants (any training overrides), back to back in each condition
The machine may be shared with other jobs: the load average printed with each number says
how idle "idle" was; compare before/after measured back to back under the same load.
"""
import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUSY = "while True: pass"


def start_competitors(k):
    return [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(k)]


def stop_competitors(procs):
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait()


def train(steps, runs_dir, extra, env, repo=ROOT):
    """One training run; returns its log entries and the wall time of the whole process."""
    cmd = [sys.executable, "multiple_task.py", "configs/cpu_quick.py", f"--max_steps={steps}",
           f"--runs_dir={runs_dir}", "--figures=False", f"--ckpt_every={steps}",
           "--max_minutes=None", *extra]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"training failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    run = next(Path(runs_dir).glob("*/log.json")).parent
    return json.loads((run / "log.json").read_text())["evals"], weights_digest(run), wall


def weights_digest(run):
    """Hash of the trained weights' bytes: equal digests mean bit-identical networks."""
    import hashlib
    import torch
    state = torch.load(run / "checkpoint.pt", weights_only=True)["state_dict"]
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def rate(evals):
    """Steps per second between the first scheduled evaluation after step 0 and the last."""
    timed = [e for e in evals if e["step"] > 0]
    first, last = timed[0], timed[-1]
    return (last["step"] - first["step"]) / (last["wall_s"] - first["wall_s"])


def measure(k, steps, extra, env, repo=ROOT):
    """One run with k competitors; `extra` items of the form NAME=VALUE (no leading --) are
    environment variables of the training process, e.g. MPN_KERNEL_THREADS=1."""
    env = dict(env, **dict(e.split("=", 1) for e in extra if not e.startswith("--")))
    extra = [e for e in extra if e.startswith("--")]
    procs = start_competitors(k)
    try:
        time.sleep(1.0 if k else 0.0)  # let the competitors get going
        load = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as runs_dir:
            evals, digest, wall = train(steps, runs_dir, extra, env, repo)
    finally:
        stop_competitors(procs)
    last = evals[-1]
    chosen = [e["kernel_threads"] for e in evals if "kernel_threads" in e]
    return dict(k=k, load=load, steps_per_s=rate(evals), wall_s=wall,
                kernel=np.mean(chosen) if chosen else float("nan"),
                acc=(last["mean_angle"], last["mean_trial"]),
                loss=last["loss"], digest=digest)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000, help="training steps per condition")
    ap.add_argument("--competitors", default="0,1,2", help="comma-separated competitor counts")
    ap.add_argument("--extra", action="append", default=None,
                    help="training overrides of one variant, e.g. --extra='--num_threads=2', "
                         "and environment variables, e.g. --extra='MPN_KERNEL_THREADS=1'; "
                         "repeat to compare variants back to back in every condition")
    ap.add_argument("--baseline_repo", default=None,
                    help="another checkout (e.g. `git worktree add /tmp/main main`) whose "
                         "training runs first in every condition, as the 'before'")
    args = ap.parse_args()
    # a plain `kill` ends the run through the finally clauses: no competitor is left spinning
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench_contention: terminated"))
    counts = [int(c) for c in args.competitors.split(",")]
    variants = [("(preset)" if not e else e, ROOT, e) for e in (args.extra or [""])]
    if args.baseline_repo:
        variants.insert(0, ("baseline repo", Path(args.baseline_repo).resolve(), ""))
    print(f"{os.cpu_count()} CPUs; {args.steps} steps of configs/cpu_quick.py per run; "
          f"variants run back to back in each condition")
    print(f"{'variant':>22} {'competitors':>11} {'load avg':>8} {'steps/s':>8} {'of idle':>8} "
          f"{'wall s':>7} {'kernel':>6} {'angle':>8} {'trial':>8} {'val loss':>12} {'weights':>12}")
    idle, results = {}, []
    for k in counts:
        for v, repo, extra in variants:
            r = measure(k, args.steps, shlex.split(extra), dict(os.environ), repo)
            results.append(r)
            if k == 0:
                idle[v] = r["steps_per_s"]
            frac = f"{100 * r['steps_per_s'] / idle[v]:7.0f}%" if v in idle else f"{'-':>8}"
            print(f"{v:>22} {k:11d} {r['load']:8.2f} {r['steps_per_s']:8.1f} "
                  f"{frac} {r['wall_s']:7.0f} {r['kernel']:6.2f} {r['acc'][0]:8.4f} {r['acc'][1]:8.4f} "
                  f"{r['loss']:.10f} {r['digest']:>12}", flush=True)
    same = len({(r["acc"], r["digest"]) for r in results}) == 1
    print("trained weights and logged accuracies bit-identical in every run: "
          + ("yes" if same else "NO"))
    losses = sorted({r["loss"] for r in results})
    print("validation loss identical in every run: " + (
        "yes" if len(losses) == 1 else
        f"no, within {(losses[-1] - losses[0]) / losses[0]:.1e} relative (torch sums over more "
        f"than 32,768 elements, e.g. 128 validation trials, depend on torch's thread count)"))


if __name__ == "__main__":
    main()
