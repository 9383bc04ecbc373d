"""The run folder: its name, its files and who makes them, and the safety of everything
written into it. Re-exported by helper (stages write `helper.save_h5`, `helper.RunPaths`, ...);
imports nothing of the project, so the model modules (net_helpers) use it directly.

- Names and paths: run_name (SPEC §4), RunPaths (every file name of a run, made here alone),
  RUN_FILES (each file and the files it is computed from), PRODUCERS (the command that makes
  each file, named in every error about it), find_runs.
- Writes: `guarded_write` is atomic (a temporary file renamed over the target), under the
  folder's writer lock (`run_lock`, an exclusive flock), and entered in the folder's manifest
  (sha256, producer, command, config hash, the sha256 of the inputs it was computed from).
- Reads: `load_json`, `load_h5`, `load_torch` refuse a missing, corrupt, altered (`verify`
  against the manifest) or stale (`check_fresh`; RunPaths.check_fresh along a run's chain of
  files) file with one sentence naming the command that remakes it. Nothing is unpickled.
"""
import contextlib
import errno
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_RUNS_DIR = "runs"
SAFE_NAME_CHARS = "A-Za-z0-9._-"
_SAFE_NAME = re.compile(rf"[{SAFE_NAME_CHARS}]*")
RUN_NAME_RULE = (f"letters, digits and . _ - only ([{SAFE_NAME_CHARS}]*, not starting with "
                 f"'.', at most 100 characters)")


class StageError(Exception):
    """An error the user can fix; its message is one sentence that says what to do."""


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
    return check_run_name(name)


def safe_name(value, max_len=100):
    """One folder-name component of letters, digits and . _ - (so never '..' or a path)."""
    return (isinstance(value, str) and _SAFE_NAME.fullmatch(value) is not None
            and not value.startswith(".") and len(value) <= max_len)


def check_run_name(name):
    """A run name is one folder name of the safe character set (no '/', no '..')."""
    if not safe_name(name, max_len=200) or not name:
        raise StageError(f"run name {name!r} is not allowed; use {RUN_NAME_RULE}.")
    return name


def runs_root(root=None):
    """The folder holding one sub-folder per run: explicit root, else $MPN_RUNS_DIR, else runs/."""
    return Path(root or os.environ.get("MPN_RUNS_DIR") or DEFAULT_RUNS_DIR)


# Which command makes which file of a run folder ({run}: the run name). Consumers name it
# in their errors, and the manifest records it.
PRODUCERS = {
    "config.json": "python multiple_task.py",
    "checkpoint.pt": "python multiple_task.py",
    "log.json": "python multiple_task.py",
    "snapshots/*": "python multiple_task.py",
    "task_variance.h5": "python multiple_task_analysis.py --run={run}",
    "cluster_info*": "python clustering.py --run={run}",
    "lesion.*": "python lesion.py --run={run}",
    "state_space.*": "python state_space_shift.py --run={run}",
    "memory_geometry.*": "python memory_geometry.py --run={run}",
    "fixed_points.*": "python fixed_points.py --run={run}",
    "timescales.*": "python timescales.py --run={run}",
    "figures/lesion_*": "python lesion_plot.py --run={run}",
    "figures/training_*": "python multiple_task.py",
    "pipeline.json": "python run_pipeline.py",
}


def producer_of(run_dir, relpath):
    """The command that (re)makes `relpath` of the run folder `run_dir`, or None."""
    for pattern, command in PRODUCERS.items():
        if fnmatch.fnmatch(relpath, pattern):
            return command.format(run=Path(run_dir).name)
    return None


def producer_for(path):
    """The command that remakes `path`: from PRODUCERS when it lies in a run folder, else
    from its file name alone (no run name to fill in), else a description."""
    path, run_dir = Path(path), run_dir_of(path)
    command = producer_of(run_dir, path.relative_to(run_dir).as_posix()) if run_dir else None
    if command is None and "{run}" not in PRODUCERS.get(path.name, "{run}"):
        command = PRODUCERS[path.name]
    return command or "the stage that writes it"


# The files of a run folder: RunPaths attribute -> (file name, the attributes of the files it
# is computed from). RunPaths.check_fresh follows these; PRODUCERS says who writes each.
RUN_FILES = {
    "config": ("config.json", ()),
    "checkpoint": ("checkpoint.pt", ()),
    "log": ("log.json", ()),
    "variance": ("task_variance.h5", ("checkpoint",)),
    "cluster_info": ("cluster_info.h5", ("variance",)),
    "cluster_info_mod": ("cluster_info_mod.h5", ("variance",)),
    "lesion": ("lesion.h5", ("checkpoint", "cluster_info", "cluster_info_mod")),
    "state_space": ("state_space.h5", ("checkpoint",)),
    "memory_geometry": ("memory_geometry.h5", ("checkpoint",)),
    "fixed_points": ("fixed_points.h5", ("checkpoint",)),
    "timescales": ("timescales.h5", ("checkpoint",)),
}


class RunPaths:
    """Every artifact of one run, under runs/<aname>/ (a safe name: the folder lies inside
    the runs root, whatever the name): one attribute per RUN_FILES entry, plus snapshots,
    figures, manifest and lock."""

    def __init__(self, aname, root=None):
        self.name = check_run_name(aname)
        self.dir = runs_root(root) / aname
        for attr, (name, _) in RUN_FILES.items():
            setattr(self, attr, self.dir / name)
        self.snapshots = self.dir / "snapshots"
        self.figures = self.dir / "figures"
        self.manifest = self.dir / MANIFEST
        self.lock = self.dir / LOCK

    def producer(self, path):
        """The command that remakes one of this run's files (see PRODUCERS)."""
        return producer_of(self.dir, Path(path).relative_to(self.dir).as_posix())

    def inputs(self, attr):
        """The paths of the files `attr` is computed from (RUN_FILES)."""
        return [getattr(self, a) for a in RUN_FILES[attr][1]]

    def check_fresh(self, attr):
        """The path of file `attr`, refused when missing or stale: check_fresh on it after
        checking every file upstream of it (RUN_FILES) that exists, so that the stalest file
        is named with the command that remakes it. File times judge only files whose
        manifest entry lacks recorded inputs."""
        path = getattr(self, attr)
        if not path.exists():
            raise _missing(path, self.producer(path))
        for up in RUN_FILES[attr][1]:
            if getattr(self, up).exists():
                self.check_fresh(up)
        check_fresh(path, producer=self.producer(path), inputs=self.inputs(attr))
        return path

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
                         f"train one with `{PRODUCERS['checkpoint.pt']}` first.")
    return runs


# ----------------------------------------------------------------------------------------
# Atomic I/O: write to a temporary file in the same folder, then rename over the target.
# A temporary file is named .<target>.<writer pid>.<random>.tmp, so that the next writer of
# the folder can tell the litter of a dead writer from the work of a live one.

MIN_FREE_BYTES = 50 * 2**20  # refuse to start writing a run folder with less free space


def _write_failed(path, err):
    reason = err.strerror or str(err) or type(err).__name__
    return StageError(f"could not write {str(path)!r} ({reason}); the previous version of the "
                      f"file (if any) is kept; free disk space or fix the folder's "
                      f"permissions, then rerun.")


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; on success it replaces `path` atomically. A
    failed write (disk full, no permission) is one sentence and leaves `path` as it was."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.",
                                   suffix=".tmp")
        os.close(fd)
        # mkstemp makes the file private (0600); give it the mode a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as err:  # ENOSPC, EDQUOT, EACCES, EROFS, or h5py's own write errors
        raise _write_failed(path, err) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


_TMP_NAME = re.compile(r"^\..+\.(\d+)\.[A-Za-z0-9_]+\.tmp$")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def clean_temp_files(folder, old_s=600):
    """Remove the temporary files of dead writers under `folder` (two levels deep): those whose
    writer PID is gone, and unnamed ones older than `old_s`. Returns the removed paths."""
    folder, removed = Path(folder), []
    for tmp in [*folder.glob(".*.tmp"), *folder.glob("*/.*.tmp")]:
        match = _TMP_NAME.match(tmp.name)
        with contextlib.suppress(FileNotFoundError):
            if (not _pid_alive(int(match.group(1))) if match
                    else time.time() - tmp.stat().st_mtime > old_s):
                tmp.unlink()
                removed.append(tmp)
    return removed


def check_writable(folder, min_free=None):
    """Before a long computation: the folder can be created and written, with free space."""
    folder = Path(folder)
    min_free = MIN_FREE_BYTES if min_free is None else min_free
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise StageError(f"{str(folder)!r} is not writable ({err.strerror or err}); fix its "
                         f"permissions or choose another runs folder (--runs_dir or "
                         f"MPN_RUNS_DIR).") from None
    free = shutil.disk_usage(folder).free
    if free < min_free:
        raise StageError(f"only {free / 2**20:.0f} MB are free for {str(folder)!r} (at least "
                         f"{min_free / 2**20:.0f} MB needed); free some disk space first.")


# ----------------------------------------------------------------------------------------
# One writer per run folder: an exclusive flock on runs/<aname>/.lock, holder PID inside.

LOCK = ".lock"
MANIFEST = "manifest.json"
_HELD = {}  # resolved run folder -> [lock file descriptor, nesting depth]


def _forget_locks_in_child():
    """Runs in every child forked from this process (os.register_at_fork): closes the child's
    copies of the lock descriptors held here, without unlocking (the parent still holds the
    lock through its own). Otherwise a forked worker or batch process that outlives a killed
    parent (kill -9, out of memory) would keep the run folder locked until it finishes; no
    forked child writes run folders."""
    for fd, _ in _HELD.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


def _lock_holder(lock_path):
    with contextlib.suppress(OSError):
        return Path(lock_path).read_text().strip() or "unknown"
    return "unknown"


@contextlib.contextmanager
def run_lock(run_dir, wait_s=0.0):
    """Hold the exclusive writer lock of a run folder (re-entrant within a process). Checks
    that the folder is writable first and removes the temp files of dead writers. Another
    process holding it (after `wait_s` seconds of retrying) is one sentence naming its PID."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield run_dir
        finally:
            _HELD[key][1] -= 1
        return
    check_writable(run_dir)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.time() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.time() >= deadline:
                os.close(fd)
                raise StageError(f"{str(run_dir)!r} is being written by another process (PID "
                                 f"{_lock_holder(run_dir / LOCK)}); wait for it to finish or "
                                 f"stop it, then rerun.") from None
            time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = [fd, 1]
    try:
        clean_temp_files(run_dir)
        if not (run_dir / MANIFEST).exists():  # marks the folder as a run folder (run_dir_of)
            with atomic_path(run_dir / MANIFEST) as tmp:
                tmp.write_text("{}")
        yield run_dir
    finally:
        del _HELD[key]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ----------------------------------------------------------------------------------------
# The manifest of a run folder: relative path -> sha256, producer, command, config hash,
# the sha256 of the inputs it was computed from, time. Written under the lock with each file
# that save_json / save_h5 / save_torch put in a run folder; checked by their loaders.


def run_dir_of(path):
    """The run folder holding `path` directly or in a sub-folder (a folder with a manifest or
    a config.json), or None when `path` lies in no run folder."""
    for folder in list(Path(path).parents)[:2]:
        if (folder / MANIFEST).exists() or (folder / "config.json").exists():
            return folder
    return None


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(run_dir):
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        return {}
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
        return manifest
    except (ValueError, UnicodeDecodeError) as err:
        raise StageError(f"{str(path)!r} is unreadable ({type(err).__name__}); restore it, or "
                         f"delete it to stop verifying this run's files.") from None


def _record(run_dir, path, written, cfg, inputs):
    """Enter a file about to replace `path` (its new content is `written`) in the manifest;
    the caller holds the lock. The entry keeps the sha256 of the version it replaces, so that a
    writer killed between the manifest and the rename leaves a consistent folder."""
    manifest = read_manifest(run_dir)
    rel = path.relative_to(run_dir).as_posix()
    entry = {"sha256": sha256(written),
             "replaces": manifest.get(rel, {}).get("sha256"),
             "producer": producer_of(run_dir, rel),
             "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
             "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if cfg is not None:
        entry["config_hash"] = config_hash(cfg)
    inside = [Path(item) for item in inputs or () if run_dir in Path(item).parents]
    if inside:  # inputs outside the run folder have no manifest entry to compare with later
        entry["inputs"] = {}
        for item in inside:
            item_rel = item.relative_to(run_dir).as_posix()
            known = manifest.get(item_rel, {}).get("sha256")
            entry["inputs"][item_rel] = known or (sha256(item) if item.exists() else None)
    manifest[rel] = entry
    with atomic_path(run_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))


@contextlib.contextmanager
def guarded_write(path, cfg=None, inputs=None):
    """atomic_path, plus, inside a run folder, the writer lock and the manifest entry."""
    path = Path(path)
    run_dir = run_dir_of(path)
    if run_dir is None:
        with atomic_path(path) as tmp:
            yield tmp
        return
    with run_lock(run_dir, wait_s=10.0), atomic_path(path) as tmp:
        yield tmp
        _record(run_dir, path, tmp, cfg, inputs)


def verify(path, producer=None):
    """Refuse a run-folder file whose sha256 differs from its manifest entry."""
    path, run_dir = Path(path), run_dir_of(path)
    producer = producer or producer_for(path)
    entry = read_manifest(run_dir).get(path.relative_to(run_dir).as_posix()) if run_dir else None
    if entry and sha256(path) not in (entry["sha256"], entry.get("replaces")):
        raise StageError(f"{str(path)!r} differs from the version its producer wrote (its "
                         f"sha256 in {MANIFEST} does not match: altered or corrupt); rerun "
                         f"`{entry.get('producer') or producer}`.")
    return entry


def check_fresh(path, obj=None, producer=None, expect_hash=None, inputs=None):
    """The one freshness check. `path` is stale when it was computed from another config
    (`expect_hash` differs from the hash stamped in `obj["_provenance"]` or in its manifest
    entry), from an older version of an input (the sha256 recorded at writing differs from
    the input's manifest entry now), or, for files without recorded inputs, when one of
    `inputs` is newer than it. `producer`: the command named in the error (default: from
    PRODUCERS). RunPaths.check_fresh runs it along a run's chain of files."""
    path, run_dir = Path(path), run_dir_of(path)
    producer = producer or producer_for(path)
    manifest = read_manifest(run_dir) if run_dir else {}
    entry = manifest.get(path.relative_to(run_dir).as_posix(), {}) if run_dir else {}
    stamp = obj.get("_provenance", {}) if isinstance(obj, dict) else {}
    found = stamp.get("config_hash") or entry.get("config_hash")
    if expect_hash is not None and found != expect_hash:
        raise StageError(f"{str(path)!r} was computed from another configuration "
                         f"(hash {found}, expected {expect_hash}); rerun `{producer}`.")
    for rel, sha in entry.get("inputs", {}).items():
        now = manifest.get(rel, {}).get("sha256")
        if sha is not None and now is not None and now != sha:
            raise StageError(f"{str(path)!r} was computed from an older {rel} (rewritten "
                             f"since); rerun `{producer}`.")
    if "inputs" not in entry and path.exists():
        for item in inputs or ():
            if Path(item).exists() and Path(item).stat().st_mtime > path.stat().st_mtime:
                raise StageError(f"{str(path)!r} is older than {str(item)!r}, which it was "
                                 f"computed from; rerun `{producer}`.")


def _missing(path, producer):
    return StageError(f"{str(path)!r} is missing; run `{producer}` first.")


def _corrupt(path, producer, err):
    return StageError(f"{str(path)!r} is unreadable ({type(err).__name__}); "
                      f"it is corrupt or incomplete, rerun `{producer}`.")


_READ_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, IndexError,
                AttributeError, UnicodeDecodeError, EOFError)


def _open_checked(path, producer, inputs=None):
    """Existence, manifest checksum and freshness of a file about to be read (`producer`
    resolved by the caller: producer_for)."""
    path = Path(path)
    if not path.exists():
        raise _missing(path, producer)
    verify(path, producer)
    check_fresh(path, None, producer, inputs=inputs)
    return path


def save_json(path, obj, cfg=None, inputs=None):
    text = json.dumps(obj, indent=1, default=_json_default)
    with guarded_write(path, cfg, inputs) as tmp:
        tmp.write_text(text)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def load_json(path, producer=None, keys=None, inputs=None):
    """Read a JSON file; refuse a missing, corrupt, altered or stale one, and, with `keys`, one
    that is not a JSON object holding those keys. Errors name `producer` (default: from
    PRODUCERS, producer_for), as in load_h5 and load_torch."""
    producer = producer or producer_for(path)
    path = _open_checked(path, producer, inputs)
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _corrupt(path, producer, err) from err
    if keys is not None and (not isinstance(obj, dict) or set(keys) - set(obj)):
        raise StageError(f"{str(path)!r} is not the file `{producer}` writes (expected a JSON "
                         f"object with the keys {sorted(keys)}); restore it, or move it away "
                         f"and rerun `{producer}`.")
    return obj


def provenance(cfg):
    return {"config_hash": config_hash(cfg), "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def load_pickle(path, producer, expect_hash=None):
    """Refuse a .pkl file: unpickling runs whatever code the file names, and a run folder
    received from someone else must be safe to open. Never unpickles."""
    path = Path(path)
    if not path.exists():
        raise _missing(path, producer)
    raise StageError(f"{str(path)!r} is an old-format pickle, which is never opened (loading a "
                     f"pickle can run code); rerun `{producer}` to rewrite it as HDF5/JSON.")


def save_h5(path, arrays, attrs=None, cfg=None, inputs=None):
    """HDF5 with Blosc(zstd) compression and the fletcher32 checksum on every array dataset;
    nested dicts become groups, attrs go on the root. `inputs`: files it was computed from
    (their sha256 goes in the run's manifest, for check_fresh)."""
    import h5py
    import hdf5plugin

    def write(group, data):
        for key, value in data.items():
            if isinstance(value, dict):
                write(group.create_group(key), value)
                continue
            value = np.asarray(value)
            if value.dtype.kind == "U":
                value = value.astype("S")
            if value.size > 1 and value.dtype.kind != "S":
                group.create_dataset(key, data=value, fletcher32=True,
                                     **hdf5plugin.Blosc(cname="zstd", clevel=5))
            elif value.ndim > 0:
                group.create_dataset(key, data=value, fletcher32=True, chunks=True)
            else:
                group.create_dataset(key, data=value)

    attrs = dict(attrs or {})
    if cfg is not None:
        attrs.update(provenance(cfg))
    with guarded_write(path, cfg, inputs) as tmp:
        with h5py.File(tmp, "w") as f:
            write(f, arrays)
            for key, value in attrs.items():
                f.attrs[key] = json.dumps(value, default=_json_default)


def load_h5(path, producer=None, expect_hash=None, inputs=None):
    """Read a file written by `save_h5` back into (nested dict of arrays, attrs); a missing,
    corrupt (checksums), altered (manifest) or stale file is one sentence."""
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
                elif isinstance(value, bytes):  # a scalar string
                    value = value.decode()
                out[key] = value
        return out

    producer = producer or producer_for(path)
    path = _open_checked(path, producer, inputs)
    try:
        with h5py.File(path, "r") as f:
            arrays = read(f)
            attrs = {k: json.loads(v) for k, v in f.attrs.items()}
    except _READ_ERRORS as err:
        raise _corrupt(path, producer, err) from err
    check_fresh(path, {"_provenance": attrs}, producer, expect_hash)
    return arrays, attrs


def save_torch(path, obj, cfg=None, inputs=None):
    import torch
    with guarded_write(path, cfg, inputs) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as err:  # torch reports a failed write (disk full) this way
            raise _write_failed(path, OSError(errno.EIO, str(err).split("\n")[0])) from None


def load_torch(path, producer=None, inputs=None):
    """torch.load with weights_only=True; a missing, truncated or altered file is a clear
    StageError."""
    import pickle  # torch's own unpickler (weights_only) reports a foreign file with this
    import torch
    producer = producer or producer_for(path)
    path = _open_checked(path, producer, inputs)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (*_READ_ERRORS, pickle.UnpicklingError) as err:
        raise _corrupt(path, producer, err) from err
