"""The CUDA paths: every engine on the GPU against the reference loop on the CPU (float64 to
1e-9, float32 to 3e-5), a whole dmpn forward+backward on the GPU against the CPU, lesion
conditions batched against one at a time on the GPU, and checkpoints that move between
devices. Marked `cuda` and skipped without a GPU; `benchmarks/gpu_check.sh` runs them.
float32 on the device: 3e-5 (cuBLAS's summation order; 1.07e-5 measured on an H200).

MPN_TEST_DEVICE=cpu runs the same tests with "cpu" in place of "cuda" (a dry run of the test
logic on a machine without a GPU; it proves nothing about CUDA).

Axis order (B, T, N), as in test_engine.
"""
import os

import numpy as np
import pytest
import torch

import lesion_engine
import mpn
import mpn_engine
import mpn_fused
import mpn_tasks
import multiple_task
import helper
import net_helpers
from test_engine import OPTION_CASES, assert_close, make_inputs

DEVICE = os.environ.get("MPN_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                 reason="no CUDA device")]
LESION_RULES = ["fdgo", "delaygo", "dmsnogo"]
TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")


def to_device(args, masks):
    """Copies of the CPU inputs on DEVICE, as leaves that keep requires_grad."""
    def move(t):
        return None if t is None else t.detach().to(DEVICE).requires_grad_(t.requires_grad)
    return {k: move(v) for k, v in args.items()}, {k: move(v) for k, v in masks.items()}


def run(engine, args, masks, **opts):
    """h, final M and the gradients of a fixed weighted loss, all returned on the CPU."""
    h, M = mpn_engine.plastic_forward(**args, **masks, **opts, engine=engine)
    wh = torch.cos(torch.arange(h.numel(), dtype=h.dtype, device=h.device)).view_as(h)
    wM = torch.sin(torch.arange(M.numel(), dtype=M.dtype, device=M.device)).view_as(M)
    inputs = [t for t in args.values() if t is not None and t.requires_grad]
    grads = torch.autograd.grad((h * wh).sum() + (M * wM).sum(), inputs, allow_unused=True)
    grads = [torch.zeros_like(t) if d is None else d for t, d in zip(inputs, grads)]
    return [t.detach().cpu() for t in (h, M, *grads)]


CASES = ["kernel_all", "everything", "recurrent", "per_trial_W", "freeze_fractional"]


@pytest.mark.parametrize("engine", [e for e in mpn_engine.ENGINES if e != "fused"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mp_type", ["mult", "add"])
# float32: cuBLAS sums in another order than the CPU; on an H200 one of these cases reached
# 1.07e-5 relative (measured), so the float32 bound on the device is 3e-5
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 3e-5)])
def test_every_engine_on_device_equals_the_reference_on_cpu(engine, case, mp_type, dtype, tol):
    # float32 at η scale 2, as in test_engine: at 3 the trajectories are chaotic enough that
    # rounding alone moves two summation orders ~1e-5 apart
    eta_scale = 3.0 if dtype == torch.float64 else 2.0
    args, masks = make_inputs(**dict(OPTION_CASES[case], eta_scale=eta_scale), B=4, T=20,
                              dtype=dtype)
    want = run("reference", args, masks, mp_type=mp_type)
    got = run(engine, *to_device(args, masks), mp_type=mp_type)
    assert_close(got, want, tol)


# Engine "fused" compiles each option set (Triton on a GPU: seconds each), so it gets two:
# between them every branch of its step functions (eta per synapse and per presynaptic unit,
# λ per postsynaptic unit, W_rec, unit mask, per-trial W and freeze mask, add and hebb_pre)
@pytest.mark.parametrize("case,dtype,tol,opts", [
    ("everything", torch.float64, 1e-9, dict()),
    ("kernel_all", torch.float32, 3e-5, dict(mp_type="add", m_update="hebb_pre"))])
def test_fused_engine_on_device_equals_the_reference_on_cpu(case, dtype, tol, opts):
    eta_scale = 3.0 if dtype == torch.float64 else 2.0
    args, masks = make_inputs(**dict(OPTION_CASES[case], eta_scale=eta_scale), B=4, T=20,
                              dtype=dtype)
    want = run("reference", args, masks, **opts)
    got = run("fused", *to_device(args, masks), **opts)
    assert_close(got, want, tol)
    assert mpn_fused._state["error"] is None, mpn_fused._state["error"]  # really compiled


@pytest.mark.parametrize("engine,dtype,tol", [("auto", torch.float64, 1e-9),
                                              ("auto", torch.float32, 1e-4),
                                              ("fused", torch.float32, 1e-4)])  # one compile
def test_dmpn_training_step_on_device_equals_cpu(dtype, tol, engine):
    """A whole network (embedding, plastic layer, readout, loss) at a realistic size: the
    gradients of every parameter agree between devices (the CPU runs engine "auto")."""
    grads = {}
    for device in ("cpu", DEVICE):
        net = mpn.build_model("dmpn", n_hidden=64, seed=1,
                              engine="auto" if device == "cpu" else engine)
        net = net.to(device=device, dtype=dtype)
        gen = torch.Generator().manual_seed(0)
        u = torch.randn(16, 60, 21, generator=gen, dtype=dtype).to(device)
        out = net(u)
        out["y"].square().mean().backward()
        grads[device] = [out["y"].detach().cpu()] + [p.grad.cpu() for p in net.parameters()]
    assert_close(grads[DEVICE], grads["cpu"], tol)


@pytest.fixture(scope="module")
def lesion_tests():
    """One short aligned batch per rule (the lesion engine takes any list of batches)."""
    rng = np.random.default_rng(5)
    return [mpn_tasks.aligned_batch(rule, 8, rng, quantile=0.0) for rule in LESION_RULES]


def test_lesion_batched_equals_one_at_a_time_on_device(lesion_tests):
    n = 12
    net = mpn.build_model("dmpn", n_hidden=n, seed=3).eval().to(DEVICE)
    rng = np.random.default_rng(0)
    table = lesion_engine.ConditionTable({"in_units": n, "hid_units": n, "w_zero": n * n,
                                          "m_freeze": n * n})
    for spec in ([{"in_units": rng.choice(n, 3, replace=False)} for _ in range(2)]
                 + [{"hid_units": rng.choice(n, 4, replace=False)} for _ in range(2)]
                 + [{"w_zero": rng.choice(n * n, 40, replace=False)},
                    {"m_freeze": rng.choice(n * n, 60, replace=False)},
                    {"w_noise": {"seed": [1, 0], "sigma": 0.2}},
                    {"in_units": [0, 1], "hid_units": [2, 3, 4]}]):
        table.add(spec)
    batched = lesion_engine.evaluate_conditions(net, lesion_tests, table.conditions,
                                                memory_mb=64)
    for i, cond in enumerate(table.conditions):
        pert = lesion_engine.condition_perturbation(cond, n, n)
        for r, (rule, batch) in enumerate(zip(LESION_RULES, lesion_tests)):
            res = net_helpers.evaluate(net, batch, perturbation=pert)
            for m in ("angle", "trial"):
                assert abs(batched[m][i, r] - res["acc"][m][rule]) <= 1e-6, (m, cond)
    assert np.ptp(batched["angle"]) > 0  # the conditions really differ


def test_checkpoints_move_between_devices(tmp_path):
    """Train on DEVICE, continue on the CPU (device is a resumable key), and rebuild the
    network from the checkpoint on either device with the same outputs."""
    common = [TINY, f"--runs_dir={tmp_path}", "--figures=False"]
    first = multiple_task.main(helper.load_config(
        multiple_task.CONFIG, common + [f"--device={DEVICE}", "--max_steps=20"], echo=False))
    second = multiple_task.main(helper.load_config(
        multiple_task.CONFIG, common + ["--device=cpu", "--max_steps=30"], echo=False))
    assert first["step"] == 20 and second["step"] == 30
    ckpt = net_helpers.load_checkpoint(second["paths"].checkpoint)
    u = torch.randn(4, 30, 21, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y_cpu = mpn.model_from_checkpoint(ckpt, "cpu")(u)["y"]
        y_dev = mpn.model_from_checkpoint(ckpt, DEVICE)(u.to(DEVICE))["y"].cpu()
    torch.testing.assert_close(y_dev, y_cpu, rtol=1e-4, atol=1e-5)
