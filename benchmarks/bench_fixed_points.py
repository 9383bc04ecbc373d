"""Time per phase of fixed_points.py (conditions, relax, polish, eigenvalues) on an untrained
network of size N (random seeded weights, the CONFIG defaults otherwise), in process CPU
seconds and wall seconds, with the counts that set each phase's cost: conditions, distinct
conditions, steps relaxed (early stop at relax_tol), conditions polished, eigensolves.

Measures the trained network's share only (the stage runs the untrained twin as well, on
untrained_trials_per_rule trials per rule); benchmarks/bench_new_stages.py times the whole
stage in its own process.
Example: python benchmarks/bench_fixed_points.py --n_hidden=300 --eig_every=10

Measured at N = 300 (load ~2-3, the trained network): 407 distinct conditions of 512;
conditions 4 s CPU; relax + polish 170 s CPU (1,923 of at most 2,000 steps per condition, in
float32: the slowest modes (|eigenvalue| ~0.998) rarely let a condition stop early; 0.22 ms
per condition-step; 94% fixed); eigenvalues 0.65 s CPU per point (41 points sampled, max
1.06 s, none unconverged), so ~265 s for all 407. Before this version (at 933fac8) a step
batch of 64 x 90,000 float64 values took ~7 ms per condition-step (25x the in-cache rate),
and ARPACK's OpenBLAS, loaded after single_thread() had limited the thread pools, spun 2
threads: 3-6 s of CPU per eigensolve.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np  # noqa: E402
import torch  # noqa: E402

import fixed_points as fp  # noqa: E402
import helper  # noqa: E402
import mpn_tasks  # noqa: E402
from bench_new_stages import make_run  # noqa: E402


class Clock:
    """Accumulated (CPU, wall) seconds per phase."""

    def __init__(self):
        self.cpu, self.wall = {}, {}

    def time(self, name, fn, *args):
        c, w = time.process_time(), time.perf_counter()
        out = fn(*args)
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c
        self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
        return out


def counting_map(counter):
    """fp.constant_input_map that adds the condition-steps it runs to counter[0]."""
    plain = fp.constant_input_map

    def constant_input_map(net, u):
        G = plain(net, u)

        def counted(s):
            counter[0] += len(s)
            return G(s)
        return counted
    return constant_input_map


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n_hidden", type=int, default=300)
    parser.add_argument("--net", default="dmpn")
    parser.add_argument("--rules", default="all", help="comma-separated rules, or all")
    parser.add_argument("--eig_every", type=int, default=1,
                        help="time the eigensolve of every k-th distinct point only")
    args = parser.parse_args()
    cfg = dict(fp.CONFIG)
    clock, steps = Clock(), [0]
    fp.constant_input_map = counting_map(steps)
    with tempfile.TemporaryDirectory() as root, helper.single_thread():
        paths = make_run(root, args.n_hidden, args.net)
        nets, train_cfg, _ = fp.load_networks(paths, False)
        net = nets["trained"]
        rules = (list(mpn_tasks.RULESETS[train_cfg["ruleset"]]) if args.rules == "all"
                 else args.rules.split(","))
        u, s0, _ = clock.time("conditions", fp.period_conditions, net, rules, cfg, "low_dim")
        first, _ = fp.unique_rows(u.numpy(), s0.numpy(), decimals=12)
        u, s0 = u[first], s0[first]
        F = fp.step_map(net, net.state_shape())
        speed0 = fp.rms_speed(F, u, s0)
        s = clock.time("relax+polish", fp.relax_and_polish, net, u, s0, cfg)
        speed = fp.rms_speed(F, u, s)
        solve_cpu, n_nan = [], 0
        for k in range(0, len(s), args.eig_every):
            c = time.process_time()
            vals = clock.time("eigenvalues", fp.leading_eigenvalues, net, F, u[k], s[k],
                              cfg["n_eigs"])
            solve_cpu.append(time.process_time() - c)
            n_nan += bool(np.isnan(vals).any())
    D = s0.shape[1]
    print(f"{args.net} N={args.n_hidden} (D={D}), {len(rules)} rules: {len(first)} distinct "
          f"conditions; relaxed {steps[0]} condition-steps ({steps[0] / len(first):.0f} per "
          f"condition, at most {cfg['n_relax']}); RMS step median {np.median(speed0):.1e} -> "
          f"{np.median(speed):.1e}, {100 * np.mean(speed < cfg['fixed_tol']):.0f}% fixed")
    for name in clock.cpu:
        per = (f"; per solve ({len(solve_cpu)} solves) CPU median {np.median(solve_cpu):.2f} s, "
               f"mean {np.mean(solve_cpu):.2f} s, max {np.max(solve_cpu):.2f} s, {n_nan} with "
               f"unconverged eigenvalues" if name == "eigenvalues" else "")
        print(f"  {name:14s} CPU {clock.cpu[name]:7.1f} s, wall {clock.wall[name]:7.1f} s{per}")
    print(f"(load average {os.getloadavg()[0]:.1f}; torch {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
