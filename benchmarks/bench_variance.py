"""Time the streamed modulation task variance for one delaydm-sized rule at N = 300
(240 trials: a delaydm condition set), per-step (default) or pooled.

Prints wall and process-CPU seconds and the peak RSS. torch threads: --threads (on a shared
2-core machine 1 thread was ~5x faster than 2 in our measurements).
Example: python benchmarks/bench_variance.py --n_hidden=300 --threads=1
"""
import argparse
import os
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import variance_core as vc  # noqa: E402
from mpn_tasks import N_DIRS  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n_hidden", type=int, default=300)
    parser.add_argument("--n_trials", type=int, default=240)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--mode", default="per_step", choices=vc.VARIANCE_MODES)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = args.n_hidden
    windows = {"stim1": (5, 45), "delay1": (45, 85), "stim2": (85, 125), "delay2": (125, 132),
               "go1": (132, 149)}  # delaydm at the maximum quantile, steps
    acc = vc.MODULATION_STREAMS[args.mode](vc.task_periods({"delaydm1": windows}), n, n)
    dirs = np.sort(np.arange(args.n_trials) % N_DIRS)  # sorted: few open directions
    M = torch.rand(args.chunk, n, n, generator=torch.Generator().manual_seed(0))
    t0, c0 = time.perf_counter(), time.process_time()
    acc.start_rule("delaydm1", windows, np.bincount(dirs, minlength=N_DIRS))
    for start in range(0, args.n_trials, args.chunk):
        chunk_dirs = dirs[start:start + args.chunk]
        acc.start_chunk(chunk_dirs)
        for t in range(windows["go1"][1]):
            acc(t, M[:len(chunk_dirs)])
    acc.end_rule()
    acc.variance()
    print(f"{args.mode}: one rule, {args.n_trials} trials, N={n}: wall {time.perf_counter() - t0:.1f} s, "
          f"cpu {time.process_time() - c0:.1f} s, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
