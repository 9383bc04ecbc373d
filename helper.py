"""Shared plumbing for every stage: configuration, run names and paths, atomic I/O, seeding,
device choice, progress bars and the figure style.

Every stage script ends with
    if __name__ == "__main__":
        helper.run_main(main, CONFIG)
which parses `configs/*.py` files and `--key=value` overrides against the script's CONFIG
block (see `load_config`) and turns a `StageError` into one clear sentence on stderr.
"""
import ast
import contextlib
import difflib
import hashlib
import inspect
import json
import os
import pickle
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_DIR = Path(__file__).resolve().parent
DEFAULT_RUNS_DIR = "runs"


class StageError(Exception):
    """An error the user can fix; its message is one sentence that says what to do."""


# ----------------------------------------------------------------------------------------
# Configuration


def _config_comments(defaults):
    """Map each CONFIG key to the trailing comment on its line in the stage's own source:
    the first module up the call stack that defines CONFIG."""
    source = None
    for frame in inspect.stack()[1:]:
        module_file = frame.frame.f_globals.get("__file__")
        if "CONFIG" in frame.frame.f_globals and module_file:
            source = Path(module_file).read_text()
            break
    comments = {}
    for line in (source or "").splitlines():
        stripped = line.strip()
        for key in defaults:
            if stripped.startswith((f"{key}=", f"{key} =", f'"{key}":', f"'{key}':")) \
                    and "#" in stripped:
                comments.setdefault(key, stripped.split("#", 1)[1].strip())
    return comments


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


def _unknown_key(key, valid):
    close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else " Run with --help to list the keys."
    return StageError(f"unknown config key {key!r}.{hint}")


def _read_config_file(path):
    """A config file is plain Python assignments; every public name becomes an override."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"config file {str(path)!r} does not exist.")
    scope = {}
    exec(compile(path.read_text(), str(path), "exec"), {}, scope)
    return {k: v for k, v in scope.items() if not k.startswith("_")}


def apply_overrides(defaults, overrides, source="", echo=True):
    """Strictly merge `overrides` into a copy of `defaults`: unknown keys and type changes fail."""
    cfg = dict(defaults)
    for key, value in overrides.items():
        if key not in defaults:
            raise _unknown_key(key, defaults)
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


def load_config(defaults, argv, echo=True):
    """Resolve a stage's configuration from its CONFIG dict and the command line.

    argv items are config files (`configs/cpu_quick.py`) applied in order, then
    `--key=value` overrides (values parsed as Python literals, e.g. --lr=3e-3,
    --rules="['fdgo']"); `--help` prints every key with its comment and exits.
    """
    if "--help" in argv or "-h" in argv:
        print_help(defaults)
        sys.exit(0)
    cfg = dict(defaults)
    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            key = key.replace("-", "_")
            value = _parse_value(text) if sep else True
            cfg = apply_overrides(cfg, {key: value}, echo=echo)
        else:
            cfg = apply_overrides(cfg, _read_config_file(arg), source=f" ({arg})", echo=echo)
    return cfg


def run_main(main, defaults, argv=None):
    """Entry point of every stage: parse the config, run, turn StageError into one sentence."""
    try:
        cfg = load_config(defaults, sys.argv[1:] if argv is None else argv)
        return main(cfg)
    except StageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def config_hash(cfg, keys=None):
    """A short stable hash of (a subset of) a config, for provenance of derived files."""
    items = {k: cfg[k] for k in (keys or sorted(cfg))}
    text = json.dumps(items, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------
# Run names and paths: every file name of the project is made here.


def _reg_tag(value):
    """1e-4 -> '1e4', 0 -> '0', 3e-5 -> '3e5', 2.5e-4 -> '2.5e4' (the reference's tag style)."""
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{abs(int(exponent))}"


def run_name(cfg):
    """SPEC §4 run identity, e.g. everything_dmpn_seed749_L21e4_h300_b128."""
    reg = _reg_tag(cfg["weight_reg"])
    if cfg.get("activity_reg", cfg["weight_reg"]) != cfg["weight_reg"]:
        reg += f"a{_reg_tag(cfg['activity_reg'])}"
    name = (f"{cfg['ruleset']}_{cfg['net']}_seed{cfg['seed']}_L2{reg}"
            f"_h{cfg['n_hidden']}_b{cfg['batch_size']}")
    if cfg.get("run_tag"):
        name += f"_{cfg['run_tag']}"
    return name


def runs_root(root=None):
    """The folder holding one sub-folder per run: explicit root, else $MPN_RUNS_DIR, else runs/."""
    return Path(root or os.environ.get("MPN_RUNS_DIR") or DEFAULT_RUNS_DIR)


class RunPaths:
    """Every artifact of one run, under runs/<aname>/."""

    def __init__(self, aname, root=None):
        self.name = aname
        self.dir = runs_root(root) / aname
        self.config = self.dir / "config.json"
        self.checkpoint = self.dir / "checkpoint.pt"
        self.log = self.dir / "log.json"
        self.snapshots = self.dir / "snapshots"
        self.figures = self.dir / "figures"
        self.variance = self.dir / "task_variance.h5"
        self.analysis = self.dir / "analysis.pkl"
        self.cluster_info = self.dir / "cluster_info.pkl"
        self.cluster_info_mod = self.dir / "cluster_info_mod.pkl"
        self.lesion = self.dir / "lesion.pkl"
        self.state_space = self.dir / "state_space.pkl"
        self.memory_geometry = self.dir / "memory_geometry.h5"
        self.fixed_points = self.dir / "fixed_points.h5"
        self.timescales = self.dir / "timescales.h5"

    def snapshot(self, step):
        return self.snapshots / f"weights_step{step:07d}.pt"

    def figure(self, name, ext="png"):
        return self.figures / f"{name}.{ext}"

    def __repr__(self):
        return f"RunPaths({str(self.dir)!r})"


def run_paths(aname_or_cfg, root=None):
    aname = aname_or_cfg if isinstance(aname_or_cfg, str) else run_name(aname_or_cfg)
    if root is None and not isinstance(aname_or_cfg, str):
        root = aname_or_cfg.get("runs_dir")
    return RunPaths(aname, root)


def find_runs(pattern, root=None, need="checkpoint"):
    """Runs whose folder name matches a glob; a clear error when none has the needed file."""
    base = runs_root(root)
    matches = sorted(p for p in base.glob(pattern) if p.is_dir())
    runs = [RunPaths(p.name, root) for p in matches]
    runs = [r for r in runs if getattr(r, need).exists()]
    if not runs:
        raise StageError(f"no run matching {pattern!r} with a {need} under {str(base)!r}; "
                         f"train one with `python multiple_task.py` first.")
    return runs


class SummaryPaths:
    """Artifacts that combine several runs, under runs/summary/."""

    def __init__(self, root=None):
        self.dir = runs_root(root) / "summary"
        self.figures = self.dir
        self.state_space = self.dir / "state_space_summary.pkl"
        self.seeds = self.dir / "seed_summary.pkl"

    def figure(self, name, ext="png"):
        return self.figures / f"{name}.{ext}"


def summary_dir(root=None):
    return SummaryPaths(root).dir


def summary_paths(root=None):
    return SummaryPaths(root)


# ----------------------------------------------------------------------------------------
# Atomic I/O: write to a temporary file in the same folder, then rename over the target.


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; on success it replaces `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    # mkstemp makes the file private (0600); give it the mode a plain open() would
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _missing(path, producer):
    return StageError(f"{str(path)!r} is missing; run `{producer}` first.")


def _corrupt(path, producer, err):
    return StageError(f"{str(path)!r} is unreadable ({type(err).__name__}); "
                      f"it is corrupt or incomplete, rerun `{producer}`.")


def save_json(path, obj):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=_json_default))


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def load_json(path, producer="the stage that writes it"):
    path = Path(path)
    if not path.exists():
        raise _missing(path, producer)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _corrupt(path, producer, err) from err


def provenance(cfg):
    return {"config_hash": config_hash(cfg), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def save_pickle(path, obj, cfg=None):
    """Pickle a dict atomically, stamped with the hash of the config it was computed from."""
    if cfg is not None and isinstance(obj, dict):
        obj = dict(obj, _provenance=provenance(cfg))
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)


def load_pickle(path, producer, expect_hash=None):
    """Load a pickle; refuse a missing, corrupt or stale one with the command that remakes it."""
    path = Path(path)
    if not path.exists():
        raise _missing(path, producer)
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
        raise _corrupt(path, producer, err) from err
    check_fresh(path, obj, producer, expect_hash)
    return obj


def check_fresh(path, obj, producer, expect_hash):
    if expect_hash is None or not isinstance(obj, dict):
        return
    found = obj.get("_provenance", {}).get("config_hash")
    if found != expect_hash:
        raise StageError(f"{str(path)!r} was computed from another configuration "
                         f"(hash {found}, expected {expect_hash}); rerun `{producer}`.")


def save_npz(path, **arrays):
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def load_npz(path, producer):
    path = Path(path)
    if not path.exists():
        raise _missing(path, producer)
    try:
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as err:
        raise _corrupt(path, producer, err) from err


def save_h5(path, arrays, attrs=None, cfg=None):
    """HDF5 with Blosc(zstd) compression; nested dicts become groups, attrs go on the root."""
    import h5py
    import hdf5plugin

    def write(group, data):
        for key, value in data.items():
            if isinstance(value, dict):
                write(group.create_group(key), value)
                continue
            value = np.asarray(value)
            if value.dtype.kind == "U":
                group.create_dataset(key, data=value.astype("S"))
            elif value.size > 1:
                group.create_dataset(key, data=value,
                                     **hdf5plugin.Blosc(cname="zstd", clevel=5))
            else:
                group.create_dataset(key, data=value)

    attrs = dict(attrs or {})
    if cfg is not None:
        attrs.update(provenance(cfg))
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            write(f, arrays)
            for key, value in attrs.items():
                f.attrs[key] = json.dumps(value, default=_json_default)


def load_h5(path, producer, expect_hash=None):
    """Read a file written by `save_h5` back into (nested dict of arrays, attrs)."""
    import h5py
    import hdf5plugin  # noqa: F401  (registers the Blosc filter)

    def read(group):
        out = {}
        for key, item in group.items():
            if isinstance(item, h5py.Group):
                out[key] = read(item)
            else:
                value = item[()]
                if isinstance(value, np.ndarray) and value.dtype.kind == "S":
                    value = value.astype("U")
                out[key] = value
        return out

    path = Path(path)
    if not path.exists():
        raise _missing(path, producer)
    try:
        with h5py.File(path, "r") as f:
            arrays = read(f)
            attrs = {k: json.loads(v) for k, v in f.attrs.items()}
    except (OSError, KeyError, ValueError) as err:
        raise _corrupt(path, producer, err) from err
    check_fresh(path, {"_provenance": attrs}, producer, expect_hash)
    return arrays, attrs


def save_torch(path, obj):
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path, producer):
    """torch.load with weights_only=True; a missing or truncated file is a clear StageError."""
    import torch
    path = Path(path)
    if not path.exists():
        raise _missing(path, producer)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError) as err:
        raise _corrupt(path, producer, err) from err


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
