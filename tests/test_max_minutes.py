"""A max_minutes stop: training says how to continue, a larger cap resumes it, and the
pipeline goes on with the later stages on the network it has."""
from pathlib import Path

import torch

import helper
import multiple_task
import run_pipeline

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
CAP = "--max_minutes=1e-6"  # stops after the first step


def test_max_minutes_stop_says_how_to_continue_and_resumes(runs_dir, capsys):
    cfg = helper.load_config(multiple_task.CONFIG, [TINY, CAP, "--figures=False"], echo=False)
    out = multiple_task.main(cfg)
    assert out["stop_reason"] == "max_minutes" and out["step"] < cfg["max_steps"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "--max_minutes=" in last and f"from step {out['step']}" in last
    more = helper.load_config(multiple_task.CONFIG, [TINY, "--max_minutes=60", "--figures=False"],
                              echo=False)
    resumed = multiple_task.main(more)
    assert f"resuming {out['paths'].name} from step {out['step']}" in capsys.readouterr().out
    assert resumed["stop_reason"] == "max_steps" and resumed["step"] == cfg["max_steps"]


def test_pipeline_runs_later_stages_after_a_max_minutes_stop(runs_dir, capsys):
    threads = torch.get_num_threads()
    paths = run_pipeline.main([TINY, CAP, "--figures=False", "--stability_seeds=1",
                               "--stability_epoch_quantiles=[0.5]", "--stages=train,analyze",
                               f"--num_threads={threads + 1}"])
    assert paths.variance.exists()
    assert torch.get_num_threads() == threads  # training's num_threads stayed with training
    lines = capsys.readouterr().out.strip().splitlines()
    assert "analyze: done" in "\n".join(lines)
    assert "max_minutes stopped it at step" in lines[-1] and "later stages" in lines[-1]
