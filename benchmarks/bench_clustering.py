"""Time the clustering core at paper size (N = 300) on random task-variance matrices.

Prints wall and process-CPU seconds per call: neurons (49 x 300, both forms) and
synapses (49 x 90,000), each with its rows.
Example: python benchmarks/bench_clustering.py --n_hidden=300 --n_repeats=100
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clustering  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n_hidden", type=int, default=300)
    parser.add_argument("--n_repeats", type=int, default=100)
    parser.add_argument("--n_restarts", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    n = args.n_hidden
    total = total_cpu = 0.0
    for name, n_cols, synapses in (("input", n, False), ("hidden", n, False),
                                   ("modulation", n * n, True)):
        V = rng.gamma(0.5, 1.0, size=(49, n_cols)) * rng.random(n_cols)
        for form in ("normalized", "unnormalized"):
            t0, c0 = time.perf_counter(), time.process_time()
            out = clustering.cluster_representation(
                V, form, rng, synapses=synapses, n_repeats=args.n_repeats,
                n_restarts=args.n_restarts)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            total += dt
            total_cpu += dc
            print(f"{name:12s} {form:13s} wall {dt:6.1f} s  cpu {dc:6.1f} s  "
                  f"k_cols={out['columns']['k_selected']}  k_rows={out['rows']['k_selected']}",
                  flush=True)
    print(f"total wall {total:.1f} s, cpu {total_cpu:.1f} s (process CPU time; "
          "modulation_weighted adds the modulation time again)")


if __name__ == "__main__":
    main()
