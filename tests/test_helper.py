"""Config parsing, run names, paths and atomic I/O of helper.py."""
import pickle

import numpy as np
import pytest

import helper

DEFAULTS = dict(n_hidden=300, lr=1e-3, net="dmpn", rules=["fdgo"], target_acc=None, resume=False)


def test_overrides_are_parsed_as_literals_and_echoed(capsys):
    cfg = helper.load_config(DEFAULTS, ["--n_hidden=64", "--lr=3e-3", "--rules=['a','b']",
                                        "--target_acc=0.9", "--resume=True"])
    assert cfg["n_hidden"] == 64 and cfg["lr"] == 3e-3 and cfg["rules"] == ["a", "b"]
    assert cfg["target_acc"] == 0.9 and cfg["resume"] is True
    assert "override: n_hidden = 64" in capsys.readouterr().out
    assert DEFAULTS["n_hidden"] == 300  # defaults untouched


def test_int_may_replace_float_but_other_type_changes_fail():
    assert helper.load_config(DEFAULTS, ["--lr=1"])["lr"] == 1.0
    assert isinstance(helper.load_config(DEFAULTS, ["--lr=1"])["lr"], float)
    with pytest.raises(helper.StageError, match="expects int"):
        helper.load_config(DEFAULTS, ["--n_hidden=1.5"])
    with pytest.raises(helper.StageError, match="expects str"):
        helper.load_config(DEFAULTS, ["--net=3"])
    with pytest.raises(helper.StageError, match="expects bool"):
        helper.load_config(DEFAULTS, ["--resume=1"])


def test_unknown_key_suggests_the_closest():
    with pytest.raises(helper.StageError, match="Did you mean n_hidden"):
        helper.load_config(DEFAULTS, ["--n_hiden=3"])


def test_config_file_overrides_and_is_strict(tmp_path):
    good = tmp_path / "preset.py"
    good.write_text("n_hidden = 32\nlr = 2e-3\n_private = 1\n")
    cfg = helper.load_config(DEFAULTS, [str(good), "--lr=5e-3"])
    assert cfg["n_hidden"] == 32 and cfg["lr"] == 5e-3
    bad = tmp_path / "bad.py"
    bad.write_text("n_hiddn = 32\n")
    with pytest.raises(helper.StageError, match="unknown config key 'n_hiddn'"):
        helper.load_config(DEFAULTS, [str(bad)])
    with pytest.raises(helper.StageError, match="does not exist"):
        helper.load_config(DEFAULTS, [str(tmp_path / "nope.py")])


def test_parse_argv_gives_each_file_and_override_in_order(tmp_path):
    preset = tmp_path / "preset.py"
    preset.write_text("n_hidden = 32\n")
    assert helper.parse_argv([str(preset), "--lr=5e-3", "--seeds=1,2", "--resume"],
                             text_keys=("seeds",)) == [
        (f" ({preset})", {"n_hidden": 32}), ("", {"lr": 5e-3}), ("", {"seeds": "1,2"}),
        ("", {"resume": True})]


def test_a_renamed_key_is_one_line_naming_its_new_name(tmp_path):
    defaults = dict(DEFAULTS, trials_per_rule=8)
    with pytest.raises(helper.StageError, match="^--n_test was renamed to --trials_per_rule.$"):
        helper.load_config(defaults, ["--n_test=3"])
    preset = tmp_path / "preset.py"
    preset.write_text("n_test = 3\n")
    with pytest.raises(helper.StageError, match="--n_test was renamed to --trials_per_rule"):
        helper.load_config(defaults, [str(preset)])
    with pytest.raises(helper.StageError, match="unknown config key 'n_test'"):
        helper.load_config(DEFAULTS, ["--n_test=3"])  # a stage without the new name


CONFIG = dict(
    n_hidden=300,  # hidden units N of the plastic layer
    lr=1e-3,  # Adam learning rate
)


def test_help_lists_every_key_with_its_comment(capsys):
    with pytest.raises(SystemExit) as exit_info:
        helper.load_config(CONFIG, ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--n_hidden" in out and "hidden units N of the plastic layer" in out
    assert "--lr" in out and "Adam learning rate" in out


def test_run_main_turns_stage_errors_into_one_line(capsys):
    def main(cfg):
        raise helper.StageError("something the user can fix.")
    with pytest.raises(SystemExit) as exit_info:
        helper.run_main(main, DEFAULTS, argv=[])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == "error: something the user can fix."


@pytest.mark.parametrize("reg, tag", [(1e-4, "1e4"), (0.0, "0"), (3e-5, "3e5"), (2.5e-4, "2.5e4")])
def test_run_name_follows_the_spec(reg, tag):
    cfg = dict(ruleset="everything", net="dmpn", seed=749, weight_reg=reg, activity_reg=reg,
               n_hidden=300, batch_size=128)
    assert helper.run_name(cfg) == f"everything_dmpn_seed749_L2{tag}_h300_b128"


def test_run_name_marks_a_different_activity_reg():
    cfg = dict(ruleset="go", net="gru", seed=1, weight_reg=1e-4, activity_reg=0.0,
               n_hidden=64, batch_size=32)
    assert helper.run_name(cfg) == "go_gru_seed1_L21e4a0_h64_b32"


def test_runs_root_comes_from_the_environment(runs_dir):
    paths = helper.run_paths("abc")
    assert paths.dir == runs_dir / "abc"
    assert paths.checkpoint.parent == paths.dir
    assert helper.run_paths("abc", root="elsewhere").dir.parts[0] == "elsewhere"
    with pytest.raises(helper.StageError, match="no run matching"):
        helper.find_runs("abc*")


def test_json_h5_round_trip(tmp_path):
    cfg = dict(a=1)
    helper.save_json(tmp_path / "x.json", {"a": np.float32(1.5), "b": np.arange(3)})
    assert helper.load_json(tmp_path / "x.json") == {"a": 1.5, "b": [0, 1, 2]}
    arrays = {"m": np.random.default_rng(0).normal(size=(49, 500)),
              "names": np.array(["fdgo-stim1", "fdgo-go1"]), "g": {"k": np.arange(5)}}
    helper.save_h5(tmp_path / "x.h5", arrays, attrs={"rows": 49}, cfg=cfg)
    back, attrs = helper.load_h5(tmp_path / "x.h5", "make it", expect_hash=helper.config_hash(cfg))
    assert np.array_equal(back["m"], arrays["m"]) and list(back["names"]) == ["fdgo-stim1", "fdgo-go1"]
    assert np.array_equal(back["g"]["k"], np.arange(5)) and attrs["rows"] == 49
    assert "created" in attrs
    assert list(tmp_path.glob(".*tmp")) == []  # no temporary files left behind


def test_h5_arrays_carry_the_fletcher32_checksum(tmp_path):
    import h5py
    helper.save_h5(tmp_path / "x.h5", {"m": np.ones((4, 4)), "v": np.arange(1), "s": 3.0})
    with h5py.File(tmp_path / "x.h5", "r") as f:
        assert f["m"].fletcher32 and f["v"].fletcher32


def test_stale_missing_and_corrupt_files_name_the_producer(tmp_path):
    helper.save_h5(tmp_path / "x.h5", {"v": np.ones(3)}, cfg=dict(a=1))
    with pytest.raises(helper.StageError, match="another configuration.*rerun `python a.py`"):
        helper.load_h5(tmp_path / "x.h5", "python a.py", expect_hash=helper.config_hash(dict(a=2)))
    with pytest.raises(helper.StageError, match="missing; run `python a.py` first"):
        helper.load_h5(tmp_path / "nope.h5", "python a.py")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(helper.StageError, match="corrupt"):
        helper.load_json(tmp_path / "bad.json", "python a.py")
    (tmp_path / "bad.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"0" * 20)
    with pytest.raises(helper.StageError, match="corrupt"):
        helper.load_h5(tmp_path / "bad.h5", "python a.py")


def test_a_pickle_is_refused_without_being_opened(tmp_path):
    (tmp_path / "old.pkl").write_bytes(pickle.dumps({"v": 1}))
    with pytest.raises(helper.StageError, match="old-format pickle.*rerun `python a.py`"):
        helper.load_pickle(tmp_path / "old.pkl", "python a.py")
    with pytest.raises(helper.StageError, match="missing; run `python a.py` first"):
        helper.load_pickle(tmp_path / "nope.pkl", "python a.py")
    assert not hasattr(helper, "save_pickle")


def test_failed_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "keep.json"
    helper.save_json(target, {"old": True})
    with pytest.raises(TypeError):
        helper.save_json(target, {"new": object()})
    assert helper.load_json(target) == {"old": True}
    assert list(tmp_path.iterdir()) == [target]


def test_written_files_get_the_usual_permissions(tmp_path):
    import os
    umask = os.umask(0o022)
    try:
        helper.save_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(umask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644


def test_run_paths_check_fresh_names_the_stalest_file_upstream(runs_dir):
    paths = helper.run_paths("a_run", runs_dir)
    helper.save_json(paths.config, {})
    helper.save_json(paths.checkpoint, {"v": 1})
    helper.save_json(paths.variance, {}, inputs=[paths.checkpoint])
    helper.save_json(paths.cluster_info, {}, inputs=[paths.variance])
    helper.save_json(paths.lesion, {}, inputs=[paths.checkpoint, paths.cluster_info])
    assert paths.check_fresh("lesion") == paths.lesion
    helper.save_json(paths.checkpoint, {"v": 2})  # retrained: everything downstream is stale
    with pytest.raises(helper.StageError, match="task_variance.h5' was computed from an older "
                       "checkpoint.pt .*; rerun `python multiple_task_analysis.py --run=a_run`"):
        paths.check_fresh("lesion")
    paths.lesion.unlink()
    with pytest.raises(helper.StageError, match="lesion.h5' is missing; run `python lesion.py "
                       "--run=a_run` first"):
        paths.check_fresh("lesion")
    assert helper.producer_for(paths.cluster_info_mod) == "python clustering.py --run=a_run"
