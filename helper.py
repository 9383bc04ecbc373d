"""Shared plumbing for every stage: configuration, seeding, device choice, progress bars and
the figure style; and, re-exported from run_folder.py, run names and paths, atomic I/O, the
writer lock and the manifest.

Every stage script ends with
    if __name__ == "__main__":
        helper.run_main(main, CONFIG)
which parses `configs/*.py` files and `--key=value` overrides against the script's CONFIG
block (see `load_config`; the braces in its comments are checked by `check_config`) and turns a
`StageError` into one clear sentence on stderr. Files written into a run folder go through
`guarded_write`: atomic, under the folder's writer lock (`run_lock`), entered in its manifest;
`load_*` verify them against it (`verify`, `check_fresh`). Nothing is ever unpickled.
"""
import ast
import contextlib
import difflib
import random
import sys
from pathlib import Path

import numpy as np

import config_rules
from run_folder import (  # noqa: F401 (the run-folder API, as helper.<name> for every stage)
    DEFAULT_RUNS_DIR, LOCK, MANIFEST, PRODUCERS, RUN_FILES, RunPaths, StageError, atomic_path,
    check_fresh, check_run_name, check_writable, clean_temp_files, config_hash, find_runs,
    guarded_write, load_h5, load_json, load_pickle, load_torch, producer_for, producer_of,
    provenance, read_manifest, run_dir_of, run_lock, run_name, run_paths, runs_root, save_h5,
    save_json, save_torch, sha256, verify)

REPO_DIR = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------
# Configuration


def _config_source(defaults):
    """The source file of the module whose CONFIG is `defaults`; else the first module up the
    call stack that defines a CONFIG."""
    for module in list(sys.modules.values()):
        if getattr(module, "CONFIG", None) is defaults and getattr(module, "__file__", None):
            return module.__file__
    frame = sys._getframe(1)
    while frame is not None:
        if "CONFIG" in frame.f_globals and frame.f_globals.get("__file__"):
            return frame.f_globals["__file__"]
        frame = frame.f_back
    return None


def _config_comments(defaults):
    """Map each CONFIG key to the trailing comment on its line in the stage's own source."""
    source = _config_source(defaults)
    comments = {}
    for line in (Path(source).read_text() if source else "").splitlines():
        stripped = line.strip()
        for key in defaults:
            if stripped.startswith((f"{key}=", f"{key} =", f'"{key}":', f"'{key}':")) \
                    and "#" in stripped:
                comments.setdefault(key, stripped.split("#", 1)[1].strip())
    return comments


# Config keys renamed so that one concept has one name across stages and one name one
# meaning (kept for one release: the old name is a one-line error naming the new one).
RENAMED = {
    "n_test": "trials_per_rule",  # lesion: trials per rule, as in every other stage
    "test_quantiles": "epoch_quantile_range",  # lesion: a [lo, hi] range of epoch quantiles
    "quantile": "epoch_quantile",  # analysis: as in state_space_shift and fixed_points
    "stability_quantiles": "stability_epoch_quantiles",  # analysis
    "stability_sigma_x": "stability_input_noise",  # analysis: the noise of analysis trials
    "sigma_x": "input_noise",  # lesion: sigma_x is training's input noise alone
    "torch_threads": "num_threads",  # analysis, lesion: as in training
    "acc_measure": "effect_measure",  # lesion_plot: acc_measure drives training alone
    "fixed_k": "fixed_cut_k",  # lesion: fixed_k is the clustering's fixed k alone
}


def _parse_value(text):
    """A command-line value as a Python literal, falling back to the bare string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _check_type(key, old, new):
    """Allow the same type, int for float, anything for a None default, None for anything."""
    if old is None or new is None:
        return new
    if isinstance(old, bool) or isinstance(new, bool):
        if isinstance(old, bool) and isinstance(new, bool):
            return new
    elif isinstance(old, float) and isinstance(new, int):
        return float(new)
    elif isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
        return type(old)(new)
    elif isinstance(new, type(old)):
        return new
    raise StageError(f"config key {key!r} expects {type(old).__name__} (default {old!r}), "
                     f"got {type(new).__name__} {new!r}.")


def unknown_key(key, valid, prefix=""):
    """The StageError for a key that is not in `valid`: the new name of a renamed key
    (RENAMED, when `valid` has it), else the close matches. `prefix`: a stage name and dot
    (run_pipeline's --<stage>.<key>)."""
    if RENAMED.get(key) in valid:
        return StageError(f"--{prefix}{key} was renamed to --{prefix}{RENAMED[key]}.")
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else " Run with --help to list the keys."
    return StageError(f"unknown config key {key!r}.{hint}")


def _read_config_file(path):
    """A config file is plain Python assignments; every public name becomes an override."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"config file {str(path)!r} does not exist.")
    scope = {}
    try:
        exec(compile(path.read_text(), str(path), "exec"), {}, scope)
    except SyntaxError as err:
        raise StageError(f"config file {str(path)!r} has a syntax error at line {err.lineno} "
                         f"({err.msg}); it must hold plain assignments such as n_hidden = 64.")
    except Exception as err:  # noqa: BLE001 (any error of the user's file is the user's to fix)
        line = err.__traceback__.tb_next.tb_lineno if err.__traceback__.tb_next else "?"
        raise StageError(f"config file {str(path)!r} fails at line {line} "
                         f"({type(err).__name__}: {err}); it must hold plain assignments of "
                         f"literal values such as n_hidden = 64.") from None
    return {k: v for k, v in scope.items() if not k.startswith("_")}


def apply_overrides(defaults, overrides, source="", echo=True):
    """Strictly merge `overrides` into a copy of `defaults`: unknown keys and type changes fail."""
    cfg = dict(defaults)
    for key, value in overrides.items():
        if key not in defaults:
            raise unknown_key(key, defaults)
        cfg[key] = _check_type(key, defaults[key], value)
        if echo:
            print(f"override{source}: {key} = {cfg[key]!r}")
    return cfg


def print_help(defaults):
    comments = _config_comments(defaults)
    print("Configuration keys (override with --key=value or a configs/*.py file):")
    width = max(len(k) for k in defaults)
    for key, value in defaults.items():
        print(f"  --{key:<{width}} = {value!r:<24} # {comments.get(key, '')}")


def parse_argv(argv, text_keys=()):
    """The overrides of a command line, in order: [(source, {key: value})], one item per config
    file (every public name it assigns; source " (<file>)") or per `--key=value` (source "";
    dashes in the key become underscores; the value parsed as a Python literal, or kept as
    text for `text_keys`; a bare `--key` is True)."""
    out = []
    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            key = key.replace("-", "_")
            value = (text if key in text_keys else _parse_value(text)) if sep else True
            out.append(("", {key: value}))
        else:
            out.append((f" ({arg})", _read_config_file(arg)))
    return out


def load_config(defaults, argv, echo=True):
    """Resolve a stage's configuration from its CONFIG dict and the command line.

    argv items are config files (`configs/cpu_quick.py`) applied in order, then
    `--key=value` overrides (values parsed as Python literals, e.g. --lr=3e-3,
    --rules="['fdgo']"); `--help` prints every key with its comment and exits. The result
    is checked against the brace annotations of the CONFIG comments (`check_config`).
    """
    if "--help" in argv or "-h" in argv:
        print_help(defaults)
        sys.exit(0)
    cfg = dict(defaults)
    for source, overrides in parse_argv(argv):
        cfg = apply_overrides(cfg, overrides, source=source, echo=echo)
    return check_config(cfg, defaults)


def run_main(main, defaults, argv=None):
    """Entry point of every stage: parse the config, run, turn StageError into one sentence."""
    try:
        cfg = load_config(defaults, sys.argv[1:] if argv is None else argv)
        return main(cfg)
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def check_config(cfg, defaults=None):
    """Refuse, with one sentence (key, value, what is allowed), the first value of `cfg` that
    breaks the brace annotation of its key in the stage's CONFIG comments."""
    comments = _config_comments(defaults if defaults is not None else cfg)
    for key, value in cfg.items():
        alternatives = config_rules.parse_constraint(comments.get(key))
        try:
            ok = not alternatives or config_rules.satisfies(value, alternatives)
        except ValueError as err:
            raise StageError(f"config key {key!r}: {err}") from None
        if not ok:
            allowed = " or ".join(config_rules.describe(a) for a in alternatives)
            raise StageError(f"config key {key!r} = {value!r} is not allowed; allowed: "
                             f"{allowed}.")
    return cfg


# ----------------------------------------------------------------------------------------
# A stage over its runs; artifacts that combine several runs


def each_run(cfg, analyze, save):
    """Run a stage's `analyze(paths, run_cfg)` then `save(result, paths, run_cfg)` on every
    run matching cfg["run"], each under its run lock; returns (results, figure paths)."""
    results, figures = [], []
    for paths in find_runs(cfg["run"], cfg["runs_dir"]):
        run_cfg = dict(cfg, run=paths.name)
        with run_lock(paths.dir):
            result = analyze(paths, run_cfg)
            figures += save(result, paths, run_cfg)
        results.append(result)
    return results, figures


def summary_dir(root=None):
    """runs/summary/: what combines several runs (seed_summary.py's tables and figures)."""
    return runs_root(root) / "summary"


# ----------------------------------------------------------------------------------------
# Seeds, devices, progress, figures


def seed_all(seed):
    """Seed Python, numpy's legacy global state and torch (library code never uses globals,
    but third-party code might)."""
    import torch
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_device(name="auto"):
    import torch
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StageError(f"device {name!r} was requested but no CUDA GPU is visible; "
                         f"use --device=cpu or --device=auto.")
    return torch.device(name)


@contextlib.contextmanager
def single_thread():
    """torch and numpy's BLAS on one thread, for code made of many small array operations:
    on a shared machine their thread pools spin on every tiny op (measured: a (48, 64, 64)
    multiply took 12 ms instead of 0.05 ms with the cores oversubscribed)."""
    import torch
    from threadpoolctl import threadpool_limits
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


def progress(iterable=None, **kwargs):
    """A tqdm bar that stays quiet when stderr is not a terminal (logs, CI, pipes)."""
    from tqdm.auto import tqdm
    kwargs.setdefault("disable", not sys.stderr.isatty())
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def set_style():
    """The one matplotlib style of the project."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({
        "figure.dpi": 110, "savefig.dpi": 150, "savefig.bbox": "tight",
        "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
        "axes.spines.top": False, "axes.spines.right": False,
        "legend.frameon": False, "image.cmap": "viridis",
    })


def save_figure(fig, path, pdf=False):
    """Write a figure (PNG, and PDF when asked) atomically and close it."""
    import matplotlib.pyplot as plt
    path = Path(path)
    for ext in ((".png", ".pdf") if pdf else (".png",)):
        target = path.with_suffix(ext)
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=ext[1:])
    plt.close(fig)
    return path.with_suffix(".png")
