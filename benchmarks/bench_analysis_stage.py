"""Wall time and peak memory of the analysis and clustering stages on an untrained paper-size
network (N = 300, all 15 rules), each stage in its own process.

Builds the checkpoint with mpn.build_model + net_helpers.save_checkpoint in a temporary runs
root, then runs `multiple_task_analysis.py` (the complete condition sets, 1,888 trials, plus
its 8 stability designs) and `clustering.py` (20 nulls per clustering, k re-chosen on the 8
designs for input and hidden) on it and prints, per stage, wall seconds, the child's CPU
seconds (user + system: the cost on an idle machine, when the machine is shared) and its
peak resident memory (getrusage).
Example: python benchmarks/bench_analysis_stage.py --n_hidden=300 --figures=True
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import helper  # noqa: E402
import mpn  # noqa: E402
import multiple_task  # noqa: E402
import net_helpers  # noqa: E402


def make_run(root, n_hidden):
    cfg = dict(multiple_task.CONFIG, n_hidden=n_hidden, runs_dir=root)
    meta = multiple_task.derived(cfg)
    net = mpn.build_model(cfg["net"], **multiple_task.model_kwargs(cfg, meta))
    paths = helper.run_paths(cfg)
    net_helpers.save_checkpoint(paths.checkpoint, net, json.loads(json.dumps(cfg)), 0)
    return paths


def run_stage(script, paths, root, extra):
    """(wall seconds, CPU seconds, peak RSS MB) of one stage run as a child process."""
    cmd = [sys.executable, os.path.join(helper.REPO_DIR, script), f"--run={paths.name}",
           f"--runs_dir={root}", *extra]
    t0 = time.perf_counter()
    pid = subprocess.Popen(cmd, stdout=subprocess.DEVNULL).pid
    _, status, usage = os.wait4(pid, 0)
    if status != 0:
        raise SystemExit(f"{script} failed (status {status})")
    return time.perf_counter() - t0, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n_hidden", type=int, default=300)
    parser.add_argument("--figures", default="True")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        paths = make_run(root, args.n_hidden)
        total = [0.0, 0.0]
        for script in ("multiple_task_analysis.py", "clustering.py"):
            wall, cpu, peak = run_stage(script, paths, root, [f"--figures={args.figures}"])
            total = [total[0] + wall, total[1] + cpu]
            print(f"{script:28s} N={args.n_hidden}: wall {wall:6.1f} s, cpu {cpu:6.1f} s, "
                  f"peak RSS {peak:6.0f} MB", flush=True)
        print(f"analysis + clustering: wall {total[0]:.1f} s, cpu {total[1]:.1f} s")
        sizes = {p.name: p.stat().st_size / 2**20 for p in paths.dir.iterdir() if p.is_file()}
        print("files: " + ", ".join(f"{k} {v:.1f} MB" for k, v in sorted(sizes.items())))
    print(f"(machine load: {os.getloadavg()[0]:.1f}; this process peak "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
