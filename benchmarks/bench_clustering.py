"""Time the clustering stage's work at paper size (N = 300) on random task-variance matrices.

Prints wall and process-CPU seconds per (representation, form) as the stage runs them:
input and hidden (49 x N, both forms, each with k re-chosen on 8 perturbed designs),
modulation (49 x N², both forms) and modulation_weighted (unnormalized), each with its rows,
every clustering with `--n_null` column-permuted nulls.
Example: python benchmarks/bench_clustering.py --n_hidden=300 --n_null=20
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clustering  # noqa: E402

N_DESIGNS = 8  # 5 noise seeds + 3 duration quantiles (multiple_task_analysis defaults)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n_hidden", type=int, default=300)
    parser.add_argument("--n_null", type=int, default=20)
    parser.add_argument("--n_restarts", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    n = args.n_hidden
    total = total_cpu = 0.0
    jobs = [("input", n, False, ("normalized", "unnormalized")),
            ("hidden", n, False, ("normalized", "unnormalized")),
            ("modulation", n * n, True, ("normalized", "unnormalized")),
            ("modulation_weighted", n * n, True, ("unnormalized",))]
    for name, n_cols, synapses, forms in jobs:
        V = rng.gamma(0.5, 1.0, size=(49, n_cols)) * rng.random(n_cols)
        designs = {f"d{i}": V * rng.uniform(0.9, 1.1, size=V.shape) for i in range(N_DESIGNS)}
        for form in forms:
            t0, c0 = time.perf_counter(), time.process_time()
            out = clustering.cluster_representation(
                V, form, rng, synapses=synapses, n_null=args.n_null, n_restarts=args.n_restarts)
            if not synapses:
                clustering.stability(out, designs, rng, n_null=args.n_null)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            total += dt
            total_cpu += dc
            print(f"{name:20s} {form:13s} wall {dt:6.1f} s  cpu {dc:6.1f} s  "
                  f"k_cols={out['columns']['k_selected']}  k_rows={out['rows']['k_selected']}",
                  flush=True)
    print(f"total wall {total:.1f} s, cpu {total_cpu:.1f} s (process CPU time)")


if __name__ == "__main__":
    main()
