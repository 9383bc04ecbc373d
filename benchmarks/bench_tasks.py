"""Task generation speed: trials per second and ms per `random_batch` of every rule.

Reads nothing, writes nothing; prints a table (median over repeats, after a warm-up). The
target is < 5 ms per 128-trial low_dim batch. Timings on a shared machine are indicative
only: rerun when the CPU is quiet.

Example:
    python benchmarks/bench_tasks.py
    python benchmarks/bench_tasks.py --batch_size=64 --repeats=500 --sigma_x=0.01
"""
import functools
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import helper  # noqa: E402
import mpn_tasks  # noqa: E402

CONFIG = dict(
    batch_size=128,  # trials per batch (B)
    repeats=200,  # timed batches per rule and io mode; the median is reported
    sigma_x=0.0,  # input noise std (0 for training batches)
    io_modes=["low_dim", "ring"],  # io modes to time: "low_dim" and/or "ring"
    seed=0,  # seed of the numpy Generator that draws the batches
)


def time_batches(rule, io_mode, cfg, rng):
    """Median seconds per random_batch call."""
    make = functools.partial(mpn_tasks.random_batch, rule, cfg["batch_size"], rng,
                             sigma_x=cfg["sigma_x"], io_mode=io_mode)
    for _ in range(5):  # warm-up: caches, allocator
        make()
    times = np.empty(cfg["repeats"])
    for i in range(cfg["repeats"]):
        start = time.perf_counter()
        make()
        times[i] = time.perf_counter() - start
    return float(np.median(times))


def main(cfg):
    rng = np.random.default_rng(cfg["seed"])
    modes = cfg["io_modes"]
    header = f"{'rule':<16}" + "".join(f"{m + ' ms/batch':>18}{m + ' trials/s':>18}" for m in modes)
    print(f"random_batch, B = {cfg['batch_size']}, median of {cfg['repeats']}")
    print(header)
    worst = {m: 0.0 for m in modes}
    for rule in mpn_tasks.RULES:
        row = f"{rule:<16}"
        for mode in modes:
            seconds = time_batches(rule, mode, cfg, rng)
            worst[mode] = max(worst[mode], seconds)
            row += f"{seconds * 1e3:>18.2f}{cfg['batch_size'] / seconds:>18,.0f}"
        print(row)
    print(f"{'slowest':<16}" + "".join(f"{worst[m] * 1e3:>18.2f}{'':>18}" for m in modes))
    return worst


if __name__ == "__main__":
    main(helper.load_config(CONFIG, sys.argv[1:]))
