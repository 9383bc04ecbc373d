"""run_pipeline.py end to end on a tiny config: every stage runs, a second call skips them all."""
import os
from pathlib import Path

import pytest

import helper
import run_pipeline

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
CHEAP = ["--stability_seeds=1", "--stability_epoch_quantiles=[0.5]", "--n_groups=20",
         "--n_restarts=2", "--n_random=2", "--n_random_combined=1",
         "--n_random_modulation=2", "--n_draws=2",
         "--trials_per_rule=8",
         "--memory_geometry.delay_ms=800", "--memory_geometry.n_shuffles=5",
         "--fixed_points.rules=['dmcgo']", "--fixed_points.trials_per_rule=2",
         "--fixed_points.n_relax=200", "--timescales.trials_per_rule=1",
         "--timescales.burn_in_steps=20", "--timescales.n_steps=100",
         "--timescales.max_lag_steps=10", "--figures=False"]


def test_every_stage_runs_then_everything_is_skipped(runs_dir, capsys):
    paths = run_pipeline.main([TINY, *CHEAP])
    for attr in ("checkpoint", "log", "variance", "cluster_info", "cluster_info_mod", "lesion",
                 "state_space", "memory_geometry", "fixed_points", "timescales"):
        assert getattr(paths, attr).exists(), attr
    state = helper.load_json(paths.dir / "pipeline.json")
    assert [name for name, *_ in run_pipeline.STAGES] == list(state)
    assert list(paths.figures.glob("lesion_*.png")), "lesion plots are drawn from the pickle"
    capsys.readouterr()
    run_pipeline.main([TINY, *CHEAP])
    out = capsys.readouterr().out
    assert out.count("up to date, skipped") == len(run_pipeline.STAGES)
    # a changed lesion setting reruns the lesion stage and nothing upstream of it
    run_pipeline.main([TINY, *CHEAP[:-1], "--n_draws=3", "--figures=False",
                       "--stages=train,analyze,lesion"])
    out = capsys.readouterr().out
    assert "train: up to date" in out and "analyze: up to date" in out
    assert "lesion: running" in out


def test_stages_read_and_write_what_run_paths_declares():
    """STAGES (what the pipeline runs) and helper.RUN_FILES (what each file is computed from)
    agree, and each written file's producer is the stage's script."""
    paths = helper.run_paths("a_run")
    for name, module, reads, writes in run_pipeline.STAGES:
        for attr in writes:
            assert set(helper.RUN_FILES[attr][1]) <= set(reads), (name, attr)
            assert paths.producer(getattr(paths, attr)).startswith(f"python {module}.py")


def test_unknown_keys_and_stages_are_refused(runs_dir):
    with pytest.raises(helper.StageError, match="Did you mean n_hidden"):
        run_pipeline.main([TINY, "--n_hiden=3"])
    with pytest.raises(helper.StageError, match="unknown stage"):
        run_pipeline.main([TINY, "--stages=train,dance"])


def test_stage_prefixed_keys_go_to_that_stage_alone(tmp_path):
    defaults = run_pipeline.stage_defaults()
    _, per_stage = run_pipeline.split_overrides(
        ["--lesion.input_noise=0.1", "--input_noise=0.05", "--train.acc_measure='angle'"],
        defaults)
    assert per_stage["lesion"]["input_noise"] == 0.1  # the stage's own key wins, in any order
    assert per_stage["state_space"]["input_noise"] == 0.05
    assert "input_noise" not in per_stage["train"]  # training's input noise is sigma_x
    assert per_stage["train"]["acc_measure"] == "angle"
    assert "acc_measure" not in per_stage["lesion_plot"]  # its measure is effect_measure
    preset = tmp_path / "preset.py"  # in a config file, a dict named after a stage
    preset.write_text("trials_per_rule = 16\nlesion = dict(trials_per_rule=64, n_random=3)\n")
    _, per_stage = run_pipeline.split_overrides([str(preset)], defaults)
    assert per_stage["lesion"] == {"trials_per_rule": 64, "n_random": 3}
    assert per_stage["fixed_points"]["trials_per_rule"] == 16
    with pytest.raises(helper.StageError, match="unknown stage 'lesions'"):
        run_pipeline.split_overrides(["--lesions.trials_per_rule=8"], defaults)
    with pytest.raises(helper.StageError, match="Did you mean trials_per_rule"):
        run_pipeline.split_overrides(["--lesion.trials_per_rle=8"], defaults)
    with pytest.raises(helper.StageError, match="unknown config key 'n_hidden'"):
        run_pipeline.split_overrides(["--lesion.n_hidden=8"], defaults)


def test_several_nets_and_seeds_run_as_processes_then_one_summary(monkeypatch, runs_dir):
    """--nets x --seeds: one process per (net, seed), the slowest architecture first, then
    seed_summary over the glob that matches exactly those runs."""
    import seed_summary
    commands, summaries = [], []

    class Done:
        returncode = 0

    monkeypatch.setattr(run_pipeline.subprocess, "run",
                        lambda cmd, env: commands.append(cmd) or Done())
    monkeypatch.setattr(seed_summary, "main", lambda cfg: summaries.append(cfg))
    run_pipeline.main([TINY, "--nets=dmpn,gru", "--seeds=3,4", "--jobs=1", "--page=x.md"])
    runs = [(c[-3], c[-2]) for c in commands]
    assert runs == [("--net=gru", "--seed=3"), ("--net=dmpn", "--seed=3"),
                    ("--net=gru", "--seed=4"), ("--net=dmpn", "--seed=4")]
    assert all("--page=x.md" in c and TINY in c for c in commands)
    cores = max(1, (os.cpu_count() or 1) // 1)  # the lesion workers: the run's share (--jobs=1)
    assert all(c[-1] == f"--processes={cores}" for c in commands)
    (cfg,) = summaries
    assert cfg["runs"] == "everything_*_seed*_L21e4_h16_b16" and cfg["page"] == "x.md"
    assert cfg["preset"] == TINY
    commands.clear()  # a --processes of the user's own is kept, not added to
    run_pipeline.main([TINY, "--seeds=3,4", "--jobs=2", "--processes=1"])
    assert all(c.count("--processes=1") == 1 and not any(
        a.startswith("--processes=") and a != "--processes=1" for a in c) for c in commands)


@pytest.mark.parametrize("arg, message", [
    ("--n_test=8", "--n_test was renamed to --trials_per_rule"),
    ("--lesion.sigma_x=0.1", "--lesion.sigma_x was renamed to --lesion.input_noise"),
    ("--lesion_plot.acc_measure=angle", "--lesion_plot.acc_measure was renamed to "
                                        "--lesion_plot.effect_measure"),
    ("--torch_threads=2", "--torch_threads was renamed to --num_threads"),
    ("--quantile=0.5", "--quantile was renamed to --epoch_quantile"),
])
def test_renamed_keys_name_their_new_name(arg, message):
    with pytest.raises(helper.StageError, match=message):
        run_pipeline.split_overrides([arg], run_pipeline.stage_defaults())
