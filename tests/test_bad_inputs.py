"""Hostile inputs (issue 15): every bad value, corrupt or crafted file, second writer and
failed write is one sentence (helper.StageError; exit code 1 from the command line, no
traceback) and leaves every file as it was."""
import errno
import importlib
import hashlib
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import helper
import multiple_task as mt
import run_folder
import run_pipeline

REPO = Path(__file__).resolve().parents[1]
TINY_FILE = str(REPO / "configs" / "tiny.py")
SMALL = ["--ruleset=go", "--max_steps=3", "--eval_every=3", "--ckpt_every=3", "--n_valid=4",
         "--snapshot_steps=[0]", "--figures=False", "--engine=fast"]


def tree(root):
    """Every file under root with its sha256: what 'nothing deleted or altered' compares."""
    root = Path(root)
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != helper.LOCK}


def small_cfg(root, **overrides):
    cfg = helper.load_config(mt.CONFIG, [TINY_FILE, *SMALL], echo=False)
    return dict(cfg, runs_dir=str(root), **overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 3-step run; tests that alter it work on a copy (see `run_copy`)."""
    return mt.main(small_cfg(tmp_path_factory.mktemp("trained")))["paths"]


@pytest.fixture
def run_copy(trained, tmp_path):
    shutil.copytree(trained.dir, tmp_path / trained.name)
    return helper.run_paths(trained.name, tmp_path)


# ----------------------------------------------------------------------------------------
# Bad config values: refused by load_config (defaults + files + overrides) before any write


BAD_TRAINING_VALUES = [
    "--grad_clip=-1", "--grad_clip=0", "--m_bounds=[1,-1]", "--m_bounds=[0,0]", "--lr=-1",
    "--n_hidden=0", "--batch_size=0", "--eval_every=0", "--ckpt_every=0", "--n_valid=0",
    "--tau_M_ms=0", "--lr_factor=2", "--seed=-1", "--io_mode=foo", "--engine=foo",
    "--device=foo", "--run_tag=../../../outside", "--run_tag=a/b", "--run_tag=.hidden",
    "--target_acc=2", "--snapshot_steps=[-1]", "--max_minutes=0",
]


@pytest.mark.parametrize("arg", BAD_TRAINING_VALUES)
def test_bad_training_value_is_one_sentence_naming_key_value_and_range(arg):
    key, _, value = arg[2:].partition("=")
    with pytest.raises(helper.StageError) as err:
        helper.load_config(mt.CONFIG, [TINY_FILE, arg], echo=False)
    message = str(err.value)
    assert message.startswith(f"config key {key!r}") and "allowed:" in message
    assert "\n" not in message and message.endswith(".")


STAGES = ["multiple_task", "multiple_task_analysis", "clustering", "lesion", "lesion_plot",
          "state_space_shift", "memory_geometry", "fixed_points", "timescales", "seed_summary",
          "run_pipeline"]
BAD_STAGE_VALUES = [
    ("clustering", "--k_max=0"), ("clustering", "--tol=0"), ("clustering", "--n_restarts=0"),
    ("lesion", "--prune_sparsity=[0,1.5]"), ("lesion", "--trials_per_rule=7"), ("lesion", "--n_draws=0"),
    ("lesion", "--forms=['foo']"), ("lesion", "--experiments=['single','dance']"),
    ("multiple_task_analysis", "--chunk_size=0"), ("multiple_task_analysis", "--variance=foo"),
    ("lesion_plot", "--effect_measure=foo"), ("state_space_shift", "--epoch_quantile=2"),
    ("memory_geometry", "--run=../x"), ("fixed_points", "--n_eigs=0"),
    ("timescales", "--n_steps=0"), ("seed_summary", "--n_permutations=5"),
    ("run_pipeline", "--nets=dmpn,lstm"),
]


@pytest.mark.parametrize("module, arg", BAD_STAGE_VALUES)
def test_bad_stage_value_is_one_sentence_before_anything_runs(module, arg):
    key = arg[2:].partition("=")[0]
    mod = importlib.import_module(module)
    with pytest.raises(helper.StageError) as err:
        helper.load_config(mod.CONFIG, [arg], echo=False)
    message = str(err.value)
    assert message.startswith(f"config key {key!r}") and "\n" not in message


@pytest.mark.parametrize("module", STAGES)
def test_every_config_key_of_every_stage_declares_its_constraint(module):
    mod = importlib.import_module(module)
    comments = helper._config_comments(mod.CONFIG)
    bare = [key for key in mod.CONFIG if not re.search(r"\{[^}]*\}\s*$", comments.get(key, ""))]
    assert not bare, f"{module}: keys without a {{constraint}}: {bare}"
    helper.load_config(mod.CONFIG, [], echo=False)  # and the defaults satisfy them


def test_the_defaults_and_presets_satisfy_their_own_constraints():
    """Every preset's keys, handed out by run_pipeline to the stages that own them, satisfy
    each stage's constraints (cpu_compare.py also sets lesion and summary keys)."""
    defaults = run_pipeline.stage_defaults()
    for preset in sorted((REPO / "configs").glob("*.py")):
        pipeline_cfg, per_stage = run_pipeline.split_overrides([str(preset)], defaults)
        helper.check_config(pipeline_cfg, run_pipeline.CONFIG)
        for name, overrides in per_stage.items():
            run_pipeline.stage_config(name, defaults[name], overrides, "x", None)
    helper.check_config(dict(run_pipeline.CONFIG), run_pipeline.CONFIG)


def test_a_bad_value_from_a_preset_file_is_refused_too(tmp_path):
    preset = tmp_path / "preset.py"
    preset.write_text("grad_clip = -1.0\n")
    with pytest.raises(helper.StageError, match=r"'grad_clip' = -1.0 is not allowed; allowed: > 0"):
        helper.load_config(mt.CONFIG, [str(preset)], echo=False)


def test_main_checks_the_config_itself_and_writes_nothing(tmp_path):
    with pytest.raises(helper.StageError, match="'batch_size' = 0"):
        mt.main(small_cfg(tmp_path, batch_size=0))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("text, what", [("n_hidden = 3 +\n", "syntax error at line 1"),
                                         ("n_hidden = 16\nlr = foo\n", "line 2 .NameError"),
                                         ("n_hidden = 1 / 0\n", "ZeroDivisionError")])
def test_a_broken_preset_is_one_sentence(tmp_path, text, what):
    preset = tmp_path / "preset.py"
    preset.write_text(text)
    with pytest.raises(helper.StageError, match=what):
        helper.load_config(mt.CONFIG, [str(preset)], echo=False)
    with pytest.raises(helper.StageError, match=what):
        run_pipeline.main([str(preset)])


@pytest.mark.parametrize("arg, key", [("--seeds=a,b", "seeds"), ("--jobs=0", "jobs"),
                                      ("--stages=train analyze", "stages"),
                                      ("--grad_clip=0", "grad_clip")])
def test_run_pipeline_refuses_bad_values_before_any_stage(runs_dir, arg, key):
    with pytest.raises(helper.StageError, match=f"config key '{key}'"):
        run_pipeline.main([TINY_FILE, arg])
    assert tree(runs_dir) == {}


def test_help_shows_the_constraints(capsys):
    with pytest.raises(SystemExit):
        helper.load_config(mt.CONFIG, ["--help"])
    out = capsys.readouterr().out
    assert "{> 0}" in out and "{None | @increasing_pair}" in out and "{@run_name}" in out


def test_constraint_grammar_on_planted_values():
    from config_rules import parse_constraint, satisfies
    assert parse_constraint("no braces here") is None
    assert parse_constraint("W_rec h_{t-1} {>= 0}") == [">= 0"]
    rule = parse_constraint("sparsities {each >= 0, < 1}")
    assert satisfies([0, 0.5, 0.99], rule) and not satisfies([0, 1.5], rule)
    assert not satisfies(0.5, rule)  # a list is expected
    rule = parse_constraint("{None | > 0}")
    assert satisfies(None, rule) and satisfies(3, rule) and not satisfies(0, rule)
    assert not satisfies(float("nan"), rule) and not satisfies(True, rule)
    rule = parse_constraint("{each raw | each mean}")
    assert satisfies(["raw", "mean"], rule) and not satisfies(["foo"], rule)
    assert satisfies([1, 2], parse_constraint("{@increasing_pair}"))
    assert not satisfies([2, 1], parse_constraint("{@increasing_pair}"))
    pattern = parse_constraint("{@run_pattern}")
    assert satisfies("everything_dmpn_seed*", pattern) and satisfies("run[12]", pattern)
    assert not satisfies("../x*", pattern) and not satisfies("a/b", pattern)
    assert satisfies(None, ["None", "@bool"]) and not satisfies(1, ["None", "@bool"])
    with pytest.raises(ValueError, match="unknown check @nope"):
        satisfies(1, ["@nope"])


# ----------------------------------------------------------------------------------------
# Run names and paths stay inside the runs folder


@pytest.mark.parametrize("name", ["../outside", "a/b", "..", ".", "", "x\x00y", "/etc"])
def test_run_paths_refuse_names_that_leave_the_runs_folder(tmp_path, name):
    with pytest.raises(helper.StageError, match="run name .* is not allowed"):
        helper.run_paths(name, tmp_path)


# ----------------------------------------------------------------------------------------
# No pickle: a crafted pickle never runs


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_pickle_is_refused_and_runs_no_code(run_copy, tmp_path):
    marker = tmp_path / "pwned"
    for attr in ("lesion", "cluster_info", "state_space"):
        getattr(run_copy, attr).write_bytes(pickle.dumps(_Exploit(marker)))
        with pytest.raises(helper.StageError, match="old-format pickle.*rerun `python x.py`"):
            helper.load_pickle(getattr(run_copy, attr), "python x.py")
    assert not marker.exists()
    pickle.loads(getattr(run_copy, "lesion").read_bytes())  # the control: it would have run
    assert marker.exists()


@pytest.mark.parametrize("module, attrs", [("lesion_plot", ["lesion"]),
                                           ("lesion", ["cluster_info", "cluster_info_mod"])])
def test_stages_never_run_a_crafted_pickle_in_a_run_folder(run_copy, tmp_path, module, attrs):
    """Row 1 as a user meets it: a run folder received with a crafted pickle in it."""
    import importlib
    stage = importlib.import_module(module)
    marker = tmp_path / "pwned"
    for attr in attrs:
        getattr(run_copy, attr).write_bytes(pickle.dumps(_Exploit(marker)))
    before = tree(run_copy.dir)
    with pytest.raises(helper.StageError):
        stage.main(dict(stage.CONFIG, run=run_copy.name, runs_dir=str(run_copy.dir.parent)))
    assert not marker.exists() and tree(run_copy.dir) == before


# ----------------------------------------------------------------------------------------
# Corrupt, garbled, altered, wrong-shape and stale files


def _garbles(raw, n, rng):
    for off in np.linspace(0, len(raw) - 16, n).astype(int):
        bad = bytearray(raw)
        bad[off:off + 16] = bytes(255 - b for b in bad[off:off + 16])
        yield bytes(bad)


def test_every_garble_of_a_run_folder_h5_is_refused(run_copy):
    target = run_copy.dir / "results.h5"
    arrays = {"v": np.random.default_rng(0).normal(size=(100, 15)), "g": {"k": np.arange(30)}}
    helper.save_h5(target, arrays, attrs={"rows": 3}, cfg={"a": 1})
    raw = target.read_bytes()
    for bad in _garbles(raw, 40, None):
        target.write_bytes(bad)
        with pytest.raises(helper.StageError, match="altered or corrupt|unreadable"):
            helper.load_h5(target, "python x.py")
    target.write_bytes(raw)
    assert np.array_equal(helper.load_h5(target, "python x.py")[0]["v"], arrays["v"])


def test_garbles_outside_a_run_folder_never_load_altered_arrays(tmp_path):
    """Without a manifest, the fletcher32 checksum still catches every garble of the data."""
    arrays = {"v": np.random.default_rng(0).normal(size=(100, 15)), "k": np.arange(30)}
    helper.save_h5(tmp_path / "x.h5", arrays)
    raw = (tmp_path / "x.h5").read_bytes()
    refused = 0
    for bad in _garbles(raw, 40, None):
        (tmp_path / "x.h5").write_bytes(bad)
        try:
            back, _ = helper.load_h5(tmp_path / "x.h5", "p")
        except helper.StageError:
            refused += 1
            continue
        assert all(np.array_equal(back[k], arrays[k]) for k in arrays)
    assert refused >= 20


@pytest.mark.parametrize("attr", ["checkpoint", "log", "config"])
def test_truncated_or_altered_run_files_name_the_producer(run_copy, attr):
    path = getattr(run_copy, attr)
    path.write_bytes(path.read_bytes()[:-7] + b"garbled")
    before = tree(run_copy.dir)
    with pytest.raises(helper.StageError, match=r"altered or corrupt\); rerun `python multiple"):
        mt.main(small_cfg(run_copy.dir.parent))
    assert tree(run_copy.dir) == before


def test_truncated_h5_is_refused(tmp_path):
    helper.save_h5(tmp_path / "x.h5", {"v": np.ones((50, 50))})
    os.truncate(tmp_path / "x.h5", 1000)
    with pytest.raises(helper.StageError, match="corrupt or incomplete"):
        helper.load_h5(tmp_path / "x.h5", "python multiple_task_analysis.py")


@pytest.mark.parametrize("attr, text, what", [
    ("log", "[1]", "expected a JSON object"), ("config", "{}", r"expected .*\['batch_size'"),
    ("log", '{"meta": {}, "evals": [1]}', "not a training log")])
def test_valid_json_of_the_wrong_shape_is_named(run_copy, attr, text, what):
    run_copy.manifest.write_text("{}")  # no entries, as from an older version: the shape check
    getattr(run_copy, attr).write_text(text)
    before = tree(run_copy.dir)
    with pytest.raises(helper.StageError, match=what):
        mt.main(small_cfg(run_copy.dir.parent, max_steps=6))
    assert tree(run_copy.dir) == before


def test_a_file_computed_from_an_older_input_is_stale(run_copy):
    result = run_copy.dir / "derived.h5"
    helper.save_h5(result, {"v": np.ones(3)}, inputs=[run_copy.checkpoint])
    helper.load_h5(result, "python derive.py")
    mt.main(small_cfg(run_copy.dir.parent, max_steps=6))  # retrain further
    with pytest.raises(helper.StageError, match="older checkpoint.pt .*rerun `python derive"):
        helper.load_h5(result, "python derive.py")


def test_without_recorded_inputs_freshness_falls_back_to_file_times(tmp_path):
    source, result = tmp_path / "a.json", tmp_path / "b.json"
    helper.save_json(result, {"v": 1})
    helper.save_json(source, {"v": 2})
    os.utime(result, (time.time() - 60, time.time() - 60))
    with pytest.raises(helper.StageError, match="older than .*a.json"):
        helper.load_json(result, "python b.py", inputs=[source])


def test_manifest_records_sha_producer_and_config_hash(trained):
    manifest = helper.read_manifest(trained.dir)
    entry = manifest["checkpoint.pt"]
    assert entry["sha256"] == helper.sha256(trained.checkpoint)
    assert entry["producer"] == "python multiple_task.py"
    assert {"config.json", "log.json", "snapshots/weights_step0000000.pt"} <= set(manifest)
    assert trained.producer(trained.variance) == f"python multiple_task_analysis.py --run={trained.name}"


def test_a_writer_killed_between_manifest_and_rename_leaves_a_readable_file(run_copy):
    old = helper.load_json(run_copy.log)

    class Killed(Exception):
        pass

    real_replace = os.replace

    def die_on_target(src, dst):
        if Path(dst) == run_copy.log:
            raise Killed
        return real_replace(src, dst)

    os.replace = die_on_target
    try:
        with pytest.raises(Killed):
            helper.save_json(run_copy.log, {"meta": {}, "evals": []})
    finally:
        os.replace = real_replace
    assert helper.load_json(run_copy.log) == old


# ----------------------------------------------------------------------------------------
# One writer per run folder; litter of dead writers


def test_a_second_trainer_is_refused_with_the_holders_pid(run_copy):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import helper, sys, time\n"
         f"with helper.run_lock({str(run_copy.dir)!r}):\n"
         "    print('locked', flush=True); time.sleep(60)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = tree(run_copy.dir)
        with pytest.raises(helper.StageError, match=f"another process \\(PID {holder.pid}\\)"):
            mt.main(small_cfg(run_copy.dir.parent, engine="reference", max_steps=6))
        assert tree(run_copy.dir) == before
    finally:
        holder.kill()
        holder.wait()
    mt.main(small_cfg(run_copy.dir.parent, max_steps=6))  # the lock died with its holder


def test_temp_files_of_dead_writers_are_cleaned_and_live_ones_kept(run_copy):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    litter = run_copy.dir / f".checkpoint.pt.{dead}.abc123_x.tmp"
    nested = run_copy.snapshots / f".weights_step0000001.pt.{dead}.zz9.tmp"
    live = run_copy.dir / f".log.json.{os.getpid()}.q1w2e3.tmp"
    for p in (litter, nested, live):
        p.write_bytes(b"partial")
    with helper.run_lock(run_copy.dir):
        pass
    assert not litter.exists() and not nested.exists() and live.exists()


# ----------------------------------------------------------------------------------------
# Unwritable folders and full disks


def test_an_unwritable_runs_folder_is_refused_before_training(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the runs folder should be")
    with pytest.raises(helper.StageError, match="is not writable"):
        mt.main(small_cfg(blocker))
    assert blocker.read_text().startswith("a file")


def test_too_little_free_space_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(run_folder, "MIN_FREE_BYTES", shutil.disk_usage(tmp_path).free * 10)
    with pytest.raises(helper.StageError, match="MB are free"):
        mt.main(small_cfg(tmp_path))


@pytest.mark.parametrize("saver", ["json", "h5", "torch"])
def test_disk_full_during_a_write_keeps_the_last_good_file(run_copy, monkeypatch, saver):
    target = run_copy.dir / f"result.{saver}"
    save = {"json": lambda: helper.save_json(target, {"v": [1, 2]}),
            "h5": lambda: helper.save_h5(target, {"v": np.ones(4)}),
            "torch": lambda: helper.save_torch(target, {"v": 1})}[saver]
    save()
    before = tree(run_copy.dir)
    real_sha = helper.sha256

    def full(path):  # fails once the new content is written, as a full disk would on close
        if ".tmp" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_sha(path)

    monkeypatch.setattr(run_folder, "sha256", full)
    with pytest.raises(helper.StageError, match="No space left on device.*previous version"):
        save()
    monkeypatch.undo()
    assert tree(run_copy.dir) == before


def test_torch_reporting_a_failed_write_is_one_sentence(tmp_path, monkeypatch):
    import torch

    def failing(*args, **kwargs):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(helper.StageError, match="could not write .*file write failed"):
        helper.save_torch(tmp_path / "x.pt", {"v": 1})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------
# From the command line: exit code 1, one line, no traceback, nothing written


@pytest.mark.parametrize("argv", [
    ["multiple_task.py", TINY_FILE, "--max_steps=1", "--run_tag=../../../outside"],
    ["run_pipeline.py", TINY_FILE, "--seeds=a,b"],
])
def test_command_line_errors_are_one_line_with_exit_code_1(tmp_path, argv):
    runs = tmp_path / "x" / "runs"
    env = dict(os.environ, MPN_RUNS_DIR=str(runs))
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []
