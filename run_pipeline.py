"""Run the whole pipeline for one configuration: train -> analyze -> cluster -> lesion ->
lesion plots -> state space -> memory geometry -> fixed points -> timescales, for one seed
or several, of one architecture or several (--nets), then, for several runs, the cross-run
summary (seed_summary.py).

Reads: config files (`configs/*.py`) and `--key=value` overrides. Each key is handed to every
stage whose CONFIG has it (e.g. --n_hidden goes to training, --n_random to the lesion stage,
--device and --trials_per_rule to every stage that has them: a key means one thing wherever it
appears); a key that no stage knows is an error. `--<stage>.<key>=value`, or
`<stage> = dict(key=value)` in a config file, goes to that stage alone and wins over the shared
form, e.g. --lesion.trials_per_rule=64 or --train.device=cuda.
Writes: everything each stage writes under runs/<aname>/, plus runs/<aname>/pipeline.json
(which stages ran, with which config, how long); with several runs, seed_summary.py's
summary under runs/summary/ (and its results page where `page` is set, as in
configs/cpu_compare.py).

A stage whose outputs exist, are newer than its inputs and were made with the same config is
skipped; --force redoes everything.

Example:
    python run_pipeline.py configs/cpu_quick.py
    python run_pipeline.py configs/cpu_quick.py --seeds=1,2,3 --jobs=3
    python run_pipeline.py configs/cpu_compare.py --nets=dmpn,vanilla,gru --seeds=1,2,3,4,5 --jobs=2
"""
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import helper

CONFIG = dict(
    seeds="",  # comma-separated seeds, e.g. "1,2,3"; empty: the training seed {@seed_list}
    nets="",  # comma-separated architectures run side by side, e.g. dmpn,vanilla,gru; empty: the training config's net {@net_list}
    jobs=1,  # seeds run in parallel as processes (each gets cores // jobs threads) {>= 1}
    force=False,  # redo every stage even when its outputs are up to date {@bool}
    stages="train,analyze,cluster,lesion,lesion_plot,state_space,memory_geometry,fixed_points,timescales",  # run in order {@stage_list}
)

# (stage name, module, RunPaths attributes it reads, RunPaths attributes it writes)
STAGES = [
    ("train", "multiple_task", [], ["checkpoint", "log"]),
    ("analyze", "multiple_task_analysis", ["checkpoint"], ["variance"]),
    ("cluster", "clustering", ["variance"], ["cluster_info", "cluster_info_mod"]),
    ("lesion", "lesion", ["checkpoint", "cluster_info", "cluster_info_mod"], ["lesion"]),
    ("lesion_plot", "lesion_plot", ["lesion"], []),
    ("state_space", "state_space_shift", ["checkpoint"], ["state_space"]),
    ("memory_geometry", "memory_geometry", ["checkpoint"], ["memory_geometry"]),
    ("fixed_points", "fixed_points", ["checkpoint"], ["fixed_points"]),
    ("timescales", "timescales", ["checkpoint"], ["timescales"]),
]

# Relative training time per step at N = 64 on one CPU thread (GRU 2x, leaky RNN 1.7x the
# dmpn's compiled kernel): the slow runs start first so the last ones do not run alone.
SLOWNESS = {"gru": 2.0, "vanilla": 1.7, "dmpn": 1.0}


def stage_defaults():
    """Each stage's CONFIG (and the cross-run summary's, for several runs), imported lazily
    so that --help stays quick."""
    import importlib
    defaults = {name: importlib.import_module(module).CONFIG for name, module, _, _ in STAGES}
    defaults["summary"] = importlib.import_module("seed_summary").CONFIG
    return defaults


def split_overrides(argv, defaults_by_stage):
    """Hand every override (from files and --key=value) to each stage that knows the key;
    `--<stage>.<key>=value`, or `<stage> = dict(key=value, ...)` in a config file, to that
    stage alone (and it wins over the shared form, in any order)."""
    merged = {}
    for _, overrides in helper.parse_argv(argv, text_keys=("seeds", "nets")):
        for key, value in overrides.items():
            if key in defaults_by_stage and isinstance(value, dict):
                merged.update({f"{key}.{bare}": v for bare, v in value.items()})
            else:
                merged[key] = value
    pipeline_cfg, per_stage = dict(CONFIG), {name: {} for name in defaults_by_stage}
    for key, value in sorted(merged.items(), key=lambda kv: "." in kv[0]):
        stage, dot, bare = key.rpartition(".")
        if dot:
            if stage not in defaults_by_stage:
                raise helper.StageError(f"unknown stage {stage!r} in --{key}; choose from "
                                        f"{sorted(defaults_by_stage)}.")
            if bare not in defaults_by_stage[stage]:
                raise helper.unknown_key(bare, defaults_by_stage[stage], prefix=f"{stage}.")
            per_stage[stage][bare] = value
            continue
        owners = [name for name, defaults in defaults_by_stage.items() if key in defaults]
        if key in CONFIG:
            pipeline_cfg = helper.apply_overrides(pipeline_cfg, {key: value}, echo=False)
        elif not owners:
            raise helper.unknown_key(key, set(CONFIG).union(*defaults_by_stage.values()))
        for name in owners:
            per_stage[name][key] = value
    return pipeline_cfg, per_stage


def stage_config(name, defaults, overrides, aname, runs_dir):
    """A stage's config, checked against its CONFIG annotations before any stage runs."""
    cfg = helper.apply_overrides(defaults, overrides, echo=False)
    if name != "train":
        cfg["run"] = aname
    if "runs_dir" in cfg and runs_dir is not None:
        cfg["runs_dir"] = runs_dir
    return helper.check_config(cfg, defaults)


def is_up_to_date(paths, state, name, cfg, inputs, outputs):
    """Outputs present, made with this very config, and fresh by the one freshness check
    (helper.check_fresh: the input hashes the manifest recorded, else file times)."""
    if state.get(name, {}).get("config_hash") != helper.config_hash(cfg):
        return False
    out_files = [getattr(paths, attr) for attr in outputs] or [paths.figures]
    if not all(p.exists() for p in out_files):
        return False
    try:
        for out in out_files:
            helper.check_fresh(out, inputs=[getattr(paths, attr) for attr in inputs])
    except helper.StageError:
        return False
    return True


def run_one_seed(pipeline_cfg, per_stage, defaults_by_stage):
    import importlib

    import torch
    wanted = pipeline_cfg["stages"].split(",")
    unknown = set(wanted) - {name for name, *_ in STAGES}
    if unknown:
        raise helper.StageError(f"unknown stage(s) {sorted(unknown)}; choose from "
                                f"{[name for name, *_ in STAGES]}.")
    train_cfg = helper.check_config(helper.apply_overrides(
        defaults_by_stage["train"], per_stage["train"], echo=False), defaults_by_stage["train"])
    aname, runs_dir = helper.run_name(train_cfg), train_cfg.get("runs_dir")
    paths = helper.run_paths(aname, runs_dir)
    state_file = paths.dir / "pipeline.json"
    state = helper.load_json(state_file) if state_file.exists() else {}
    cfgs = {name: stage_config(name, defaults_by_stage[name], per_stage[name], aname, runs_dir)
            for name, *_ in STAGES if name in wanted}
    note = None
    for name, module, inputs, outputs in STAGES:
        if name not in wanted:
            continue
        cfg = cfgs[name]
        if not pipeline_cfg["force"] and is_up_to_date(paths, state, name, cfg, inputs, outputs):
            print(f"[{aname}] {name}: up to date, skipped")
            continue
        print(f"[{aname}] {name}: running {module}.py")
        start = time.time()
        threads = torch.get_num_threads()
        try:
            result = importlib.import_module(module).main(cfg)
        finally:  # a stage's own thread count (training's num_threads) stays with that stage
            torch.set_num_threads(threads)
        if name == "train" and result["stop_reason"] == "max_minutes":
            note = (f"[{aname}] train: max_minutes stopped it at step {result['step']} of "
                    f"{cfg['max_steps']}; the later stages run on the network trained so far. "
                    f"To finish training, rerun with a larger --max_minutes (it resumes).")
            print(note)
        state[name] = dict(config_hash=helper.config_hash(cfg), seconds=round(time.time() - start, 1),
                           finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
        helper.save_json(state_file, state)
        print(f"[{aname}] {name}: done in {state[name]['seconds']:.0f} s")
    print_figures(paths)
    if note:
        print(note)
    return paths


def print_figures(paths):
    figures = sorted(paths.figures.glob("*.png")) if paths.figures.exists() else []
    print(f"\n{len(figures)} figures of {paths.name} in {paths.figures}:")
    for fig in figures:
        print(f"  {fig}")


def seed_command(base, net, seed, cores):
    """The command line of one (net, seed) pipeline of a parallel sweep; the worker processes
    of its lesion and clustering stages are held to the run's share of the cores unless base
    sets them."""
    cmd = [sys.executable, __file__, *base, *([f"--net={net}"] if net else []), f"--seed={seed}"]
    if not any(a.startswith("--processes") for a in base):
        cmd.append(f"--processes={cores}")
    return cmd


def run_in_parallel(argv, runs, jobs):
    """Each (net, seed) in its own process (python run_pipeline.py ... --net=X --seed=S), jobs
    at a time, the slowest architecture's runs first."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    base = [a for a in argv if not a.startswith(("--seeds", "--jobs", "--nets"))]

    def one(run):
        return run, subprocess.run(seed_command(base, *run, threads), env=env).returncode

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        failed = [run for run, rc in pool.map(one, runs) if rc != 0]
    if failed:
        raise helper.StageError(f"the pipeline failed for (net, seed) {failed}; see their output "
                                f"above.")


def main(argv):
    defaults_by_stage = stage_defaults()
    pipeline_cfg, per_stage = split_overrides(argv, defaults_by_stage)
    helper.check_config(pipeline_cfg, CONFIG)
    seeds = [int(s) for s in str(pipeline_cfg["seeds"]).split(",") if str(s).strip()]
    nets = [n for n in pipeline_cfg["nets"].split(",") if n]
    if len(seeds) <= 1 and len(nets) <= 1:
        if seeds:
            per_stage["train"]["seed"] = seeds[0]
        if nets:
            per_stage["train"]["net"] = nets[0]
        return run_one_seed(pipeline_cfg, per_stage, defaults_by_stage)
    slow_first = sorted(nets or [""], key=lambda n: SLOWNESS.get(n, 0), reverse=True)
    seeds = seeds or [per_stage["train"].get("seed", defaults_by_stage["train"]["seed"])]
    run_in_parallel(argv, [(n, s) for s in seeds for n in slow_first], pipeline_cfg["jobs"])
    train_cfg = helper.apply_overrides(defaults_by_stage["train"], per_stage["train"], echo=False)
    name = helper.run_name(dict(train_cfg, net="NET", seed=0))
    pattern = name.replace("_seed0_", "_seed*_").replace("_NET_", "_*_" if len(nets) > 1 else
                                                          f"_{nets[0] if nets else train_cfg['net']}_")
    presets = [a for a in argv if not a.startswith("--")]
    import seed_summary
    summary_cfg = helper.apply_overrides(seed_summary.CONFIG, dict(
        per_stage["summary"], runs=pattern, runs_dir=train_cfg.get("runs_dir"),
        preset=presets[0] if presets else None), echo=False)
    seed_summary.main(helper.check_config(summary_cfg, seed_summary.CONFIG))

if __name__ == "__main__":
    if "--help" in sys.argv or "-h" in sys.argv:
        print(__doc__)
        helper.print_help(CONFIG)
        sys.exit(0)
    try:
        main(sys.argv[1:])
    except helper.StageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
