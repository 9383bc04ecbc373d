"""Accuracy against training cost for variants of the CPU preset (issue: preset headroom).

Reads the log.json and config.json of finished training runs (made with
`python multiple_task.py configs/cpu_quick.py --run_tag=<name> <overrides>`) and prints, per
run: what it changes from configs/cpu_quick.py, its process CPU time per step (logged since
the `cpu_s` field exists; runs trained side by side compare fairly), the mean accuracy
(`angle` / `trial`) at a few step counts, and the first evaluation where the preset's promise
(mean `angle` >= 0.90 and `trial` >= 0.95) holds, with the run's own training wall time
there (a first run on a machine includes the kernel build; a busy machine, its slowdown).
The CPU time is the training process's own: since `prefetch` (7 Dec) a forked child draws the
batches, ~2 ms a step not counted, so compare CPU times of runs trained the same way.

Accuracy per step is deterministic on one CPU type, whatever the load, so the steps-axis is
exact; the time-axis is steps x seconds per step, which depends on the machine: pass the idle
rate measured on yours (--idle_steps_per_s, evaluations included) to convert steps to minutes
of training.

Example:
    python benchmarks/bench_preset_frontier.py --runs='/tmp/x17/exp/everything_*' \
        --idle_steps_per_s=28 --marks=12000,18000,24000,36000
"""
import argparse
import glob
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import helper  # noqa: E402
import multiple_task  # noqa: E402

PROMISE = {"mean_angle": 0.90, "mean_trial": 0.95}
IGNORED = {"runs_dir", "run_tag", "max_minutes", "figures", "max_steps", "resume"}


def preset():
    return helper.load_config(multiple_task.CONFIG, [str(ROOT / "configs" / "cpu_quick.py")],
                              echo=False)


def changes(cfg, base):
    """The run's config keys that differ from the preset (bookkeeping keys, and the plateau
    schedule's keys under a cosine schedule, left out)."""
    unused = {"lr_factor", "lr_patience"} if cfg.get("lr_schedule") == "cosine" else set()
    return {k: v for k, v in cfg.items()
            if k not in IGNORED | unused and base.get(k) != v}


def first_promise(evals):
    """The first evaluation that keeps the promise, or None."""
    return next((e for e in evals if all(e[k] >= v for k, v in PROMISE.items())), None)


def row(folder, base, marks, idle_rate):
    cfg = json.loads((folder / "config.json").read_text())
    evals = json.loads((folder / "log.json").read_text())["evals"]
    by_step = {e["step"]: e for e in evals}
    last = evals[-1]
    cpu = f"{1e3 * last['cpu_s'] / last['step']:.1f}" if last.get("cpu_s") else "–"
    accs = [f"{by_step[m]['mean_angle']:.3f} / {by_step[m]['mean_trial']:.3f}"
            if m in by_step else "–" for m in marks]
    hit = first_promise(evals)
    when = "not reached" if hit is None else (
        f"step {hit['step']}, {hit['wall_s'] / 60:.1f} min into this run" +
        (f" ({hit['step'] / idle_rate / 60:.1f} min at the idle rate)" if idle_rate else ""))
    change = ", ".join(f"{k}={v}" for k, v in changes(cfg, base).items()) or "the preset"
    return [folder.name.rsplit("_", 1)[-1], change, cpu, *accs,
            f"{last['mean_angle']:.3f} / {last['mean_trial']:.3f} at {last['step']}", when]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True, help="glob of run folders")
    p.add_argument("--marks", default="12000,18000,24000,36000")
    p.add_argument("--idle_steps_per_s", type=float, default=None,
                   help="the preset's idle training rate on this machine (steps/s)")
    args = p.parse_args(argv)
    marks = [int(m) for m in args.marks.split(",")]
    folders = sorted(Path(f) for f in glob.glob(args.runs) if (Path(f) / "log.json").exists())
    if not folders:
        raise SystemExit(f"no run folder with a log.json matches {args.runs!r}")
    base = preset()
    header = ["run", "changes from cpu_quick", "CPU ms/step", *[f"at {m}" for m in marks],
              "last", "angle >= 0.90 and trial >= 0.95 first at"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for folder in folders:
        print("| " + " | ".join(row(folder, base, marks, args.idle_steps_per_s)) + " |")


if __name__ == "__main__":
    main()
