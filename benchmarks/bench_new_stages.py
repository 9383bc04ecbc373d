"""Wall time and peak memory of the memory-geometry, fixed-point and timescale stages on an
untrained paper-size network (N = 300, all 15 rules, random seeded weights), each stage in
its own process with its default CONFIG (the untrained-twin baseline included).

Builds the checkpoint with mpn.build_model + net_helpers.save_checkpoint in a temporary runs
root, runs each stage on it and prints, per stage, wall seconds and the peak resident memory
of the child process (getrusage, the same number as /usr/bin/time -v's "Maximum resident
set size"), its CPU seconds (user + system: on a shared machine wall time is inflated by the
other processes, CPU time much less) and the load average around it, then the size of each
result file.
Example: python benchmarks/bench_new_stages.py --n_hidden=300
         python benchmarks/bench_new_stages.py --stages=fixed_points --n_hidden=64

Measured, fixed_points (2-core machine shared with a 2-process training sweep, nice 5):
  N = 64:  before (933fac8) wall 186 s, CPU 126 s, peak 638 MB (load ~3.3);
           now wall 48-50 s, CPU 32-33 s, peak 474-482 MB (load ~3), the same summary (97%
           fixed, leading |eigenvalue| median 0.9926 [0.9901, 1.0073], 13% within 1e-3 of λ,
           56% clipped), the untrained twin on 128 points instead of 512.
  N = 300: before: not finished after 22 min wall / 18 min CPU (peak 1.6 GB);
           now wall 550 s, CPU 543 s, peak 2.54 GB (load ~2: the sweep only), and wall
           5,157 s for CPU 603 s, peak 2.56 GB, when other jobs held the machine at load 8-10
           and this one ran at nice 15 (3-10% of a core). Per phase: bench_fixed_points.py.
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

SCRIPTS = {"memory_geometry": "memory_geometry.py", "fixed_points": "fixed_points.py",
           "timescales": "timescales.py"}


def make_run(root, n_hidden, net):
    cfg = dict(multiple_task.CONFIG, n_hidden=n_hidden, runs_dir=root, net=net)
    model = mpn.build_model(cfg["net"], **multiple_task.model_kwargs(cfg, multiple_task.derived(cfg)))
    paths = helper.run_paths(cfg)
    net_helpers.save_checkpoint(paths.checkpoint, model, json.loads(json.dumps(cfg)), 0)
    return paths


def run_stage(script, paths, root, extra):
    """(wall seconds, CPU seconds (user + system), peak RSS MB) of one stage run as a child
    process."""
    cmd = [sys.executable, os.path.join(helper.REPO_DIR, script), f"--run={paths.name}",
           f"--runs_dir={root}", *extra]
    t0 = time.perf_counter()
    pid = subprocess.Popen(cmd, stdout=subprocess.DEVNULL).pid
    _, status, usage = os.wait4(pid, 0)
    if status != 0:
        raise SystemExit(f"{script} failed (status {status})")
    return (time.perf_counter() - t0, usage.ru_utime + usage.ru_stime,
            usage.ru_maxrss / 1024)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n_hidden", type=int, default=300)
    parser.add_argument("--net", default="dmpn")
    parser.add_argument("--stages", default=",".join(SCRIPTS))
    parser.add_argument("--extra", default="", help="extra --key=value args for every stage")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        paths = make_run(root, args.n_hidden, args.net)
        for stage in args.stages.split(","):
            load = os.getloadavg()[0]
            wall, cpu, peak = run_stage(SCRIPTS[stage], paths, root, args.extra.split())
            print(f"{stage:16s} {args.net} N={args.n_hidden}: wall {wall:6.1f} s, "
                  f"CPU {cpu:6.1f} s, peak RSS {peak:6.0f} MB (load average {load:.1f} before, "
                  f"{os.getloadavg()[0]:.1f} after)", flush=True)
        sizes = {p.name: p.stat().st_size / 2**20 for p in paths.dir.iterdir() if p.is_file()}
        print("files: " + ", ".join(f"{k} {v:.2f} MB" for k, v in sorted(sizes.items())))
    print(f"(machine load: {os.getloadavg()[0]:.1f}; this process peak "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
