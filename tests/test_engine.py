"""The fast plastic-layer engines ("fast"; "cpp": the compiled kernel of mpn_cpp; "fused": the
per-step functions of mpn_fused) against the plain reference loop (SPEC §1.1). "fused" runs
its step functions uncompiled here (conftest: the equations); the tests at the end compile them.

Axis order (B, T, N). Every case compares outputs h, the final M and the gradients w.r.t.
every input that requires grad: float64 to 1e-9, float32 to 1e-5 (relative to each tensor's
largest entry). Sizes are tiny so the whole file runs in seconds.
"""
import itertools
import os
import time

import pytest
import numpy as np
import torch

import mpn_cpp
import mpn_engine
import mpn_fused

N_PRE, N_POST = 5, 4
SHAPES = {"scalar": (), "pre": (1, N_PRE), "post": (N_POST, 1), "matrix": (N_POST, N_PRE)}


def make_inputs(*, B=3, T=7, eta_kind="scalar", lam_kind="scalar", eta_scale=3.0,
                recurrent=False, per_trial_W=False, hid_mask=False, m_freeze=None,
                train_lam=True, dtype=torch.float64, seed=0):
    """Inputs for one call; eta_scale = 3 makes λM + η post xᵀ leave [-1, 1] (the clip binds)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(shape, generator=g, dtype=dtype)

    x = torch.tanh(2 * randn(B, T, N_PRE))
    W = randn(B, N_POST, N_PRE) if per_trial_W else randn(N_POST, N_PRE)
    eta = eta_scale * (1 + 0.3 * randn(*SHAPES[eta_kind]))
    lam = 0.9 + 0.09 * torch.rand(SHAPES[lam_kind], generator=g, dtype=dtype)
    args = dict(x=x, W=W, b=randn(N_POST), eta=eta, lam=lam,
                W_rec=0.5 * randn(N_POST, N_POST) if recurrent else None)
    for name, t in args.items():
        if t is not None and (train_lam or name != "lam"):
            t.requires_grad_()
    masks = dict(hid_mask=None, m_freeze=None)
    if hid_mask:
        masks["hid_mask"] = (torch.rand(B, N_POST, generator=g) > 0.3).to(dtype)
    if m_freeze == "shared":
        masks["m_freeze"] = (torch.rand(N_POST, N_PRE, generator=g) > 0.7).to(dtype)
    elif m_freeze == "fractional":  # not a lesion mask, but the equations still hold
        masks["m_freeze"] = torch.rand(B, N_POST, N_PRE, generator=g, dtype=dtype)
    elif m_freeze == "per_trial":
        masks["m_freeze"] = (torch.rand(B, N_POST, N_PRE, generator=g) > 0.7).to(dtype)
    return args, masks


def run(engine, args, masks, loss="both", **opts):
    """Outputs and gradients of a fixed random-weighted loss, as one list of tensors."""
    h, M = mpn_engine.plastic_forward(**args, **masks, **opts, engine=engine)
    wh = torch.cos(torch.arange(h.numel(), dtype=h.dtype)).view_as(h)
    wM = torch.sin(torch.arange(M.numel(), dtype=M.dtype)).view_as(M)
    total = {"both": (h * wh).sum() + (M * wM).sum(), "h": (h * wh).sum(),
             "M": (M * wM).sum()}[loss]
    inputs = [t for t in args.values() if t is not None and t.requires_grad]
    grads = torch.autograd.grad(total, inputs, allow_unused=True)
    grads = [torch.zeros_like(t) if d is None else d for t, d in zip(inputs, grads)]
    return [h.detach(), M.detach(), *grads]


def assert_close(got, want, rtol):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        scale = b.abs().max().clamp_min(1e-12)
        err = ((a - b).abs().max() / scale).item()
        assert err <= rtol, f"tensor {i}: relative error {err:.2e} > {rtol:.0e}"


def clip_binds(args, masks, mp_type="mult", m_update="hebb_assoc", m_bounds=(-1.0, 1.0)):
    """True when some pre-clip value λ M_{t-1} + η post_t x_tᵀ leaves the bounds."""
    prev = []
    with torch.no_grad():
        h, _ = mpn_engine.plastic_forward(**args, **masks, mp_type=mp_type, m_update=m_update,
                                          m_bounds=m_bounds, record=lambda t, M: prev.append(M),
                                          engine="reference")
        x = args["x"]
        post = h if m_update == "hebb_assoc" else torch.full_like(h, N_POST ** -0.5)
        for t, M in enumerate(prev):
            pre = args["lam"] * M + args["eta"] * post[:, t, :, None] * x[:, t, None, :]
            if (pre < m_bounds[0]).any() or (pre > m_bounds[1]).any():
                return True
    return False


@pytest.fixture
def small_chunks(monkeypatch):
    """One trial per chunk, so chunking and the worker threads are exercised."""
    monkeypatch.setattr(mpn_engine, "CHUNK_BYTES", 1)


FAST = ["fast", "cpp", "fused"]  # "cpp" runs the kernel where it handles the call, "fast" elsewhere


@pytest.mark.parametrize("engine", FAST)
@pytest.mark.parametrize("mp_type,m_update", itertools.product(["mult", "add"],
                                                               ["hebb_assoc", "hebb_pre"]))
@pytest.mark.parametrize("eta_kind,lam_kind", itertools.product(SHAPES, SHAPES))
def test_fast_matches_reference_every_parameter_shape(mp_type, m_update, eta_kind, lam_kind,
                                                      engine):
    args, masks = make_inputs(eta_kind=eta_kind, lam_kind=lam_kind)
    opts = dict(mp_type=mp_type, m_update=m_update)
    assert clip_binds(args, masks, **opts)
    assert_close(run(engine, args, masks, **opts), run("reference", args, masks, **opts), 1e-9)


OPTION_CASES = {
    "recurrent": dict(recurrent=True),
    "per_trial_W": dict(per_trial_W=True),
    "hid_mask": dict(hid_mask=True),
    "freeze_shared": dict(m_freeze="shared"),
    "freeze_per_trial": dict(m_freeze="per_trial"),
    "freeze_fractional": dict(m_freeze="fractional", eta_kind="post"),
    "everything": dict(recurrent=True, per_trial_W=True, hid_mask=True, m_freeze="per_trial",
                       eta_kind="matrix", lam_kind="post"),
    "lam_fixed": dict(train_lam=False, eta_kind="pre"),
    "long_T": dict(T=30, recurrent=True, eta_scale=1.0),
    "kernel_all": dict(recurrent=True, hid_mask=True, m_freeze="per_trial", eta_kind="pre",
                       lam_kind="post"),  # everything the compiled kernel handles
}


@pytest.mark.parametrize("engine", FAST)
@pytest.mark.parametrize("case", OPTION_CASES)
@pytest.mark.parametrize("mp_type", ["mult", "add"])
@pytest.mark.parametrize("m_bounds", [(-1.0, 1.0), (-0.5, 0.8), None])
def test_fast_matches_reference_options(case, mp_type, m_bounds, engine, small_chunks):
    args, masks = make_inputs(**OPTION_CASES[case])
    opts = dict(mp_type=mp_type, m_bounds=m_bounds)
    if m_bounds is not None:
        assert clip_binds(args, masks, mp_type=mp_type, m_bounds=m_bounds)
    assert_close(run(engine, args, masks, **opts), run("reference", args, masks, **opts), 1e-9)


@pytest.mark.parametrize("engine", FAST)
@pytest.mark.parametrize("loss", ["h", "M"])
def test_gradient_from_one_output_only(loss, engine):
    args, masks = make_inputs(recurrent=True, hid_mask=True)
    assert_close(run(engine, args, masks, loss=loss), run("reference", args, masks, loss=loss),
                 1e-9)


@pytest.mark.parametrize("engine", FAST)
@pytest.mark.parametrize("case", ["everything", "recurrent", "kernel_all", "lam_fixed"])
def test_float32_matches_reference(case, engine, small_chunks):
    args, masks = make_inputs(**OPTION_CASES[case], B=4, T=20, dtype=torch.float32)
    assert clip_binds(args, masks)
    assert_close(run(engine, args, masks), run("reference", args, masks), 1e-5)


@pytest.mark.parametrize("engine", FAST)
def test_no_grad_forward_matches_reference(engine, small_chunks):
    args, masks = make_inputs(recurrent=True, hid_mask=True, m_freeze="shared")
    with torch.no_grad():
        want = mpn_engine.plastic_forward(**args, **masks, engine="reference")
        got = mpn_engine.plastic_forward(**args, **masks, engine=engine)
    assert_close(list(got), list(want), 1e-9)


@pytest.mark.parametrize("engine", ["reference", *FAST])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sequence_continued_from_m_init_equals_one_call(engine, dtype, small_chunks,
                                                        monkeypatch):
    """Steps [0, t) in one call and [t, T) in a second from its final M (m_init) give the
    same h and M as one call over [0, T), bit for bit: the lesion engine runs the shared
    prefix of identical trials once and continues each trial from its M."""
    if engine == "cpp" and mpn_cpp.kernel() is not None:  # the kernel itself, no fallback
        monkeypatch.setattr(mpn_engine, "plastic_forward_fast", None)
    args, masks = make_inputs(B=4, T=9, hid_mask=True, m_freeze="per_trial", dtype=dtype)
    opts = dict(**{k: v for k, v in args.items() if k != "x"}, **masks, engine=engine)
    x = args["x"].detach()
    with torch.no_grad():
        h, M = mpn_engine.plastic_forward(x, **opts)
        h1, M1 = mpn_engine.plastic_forward(x[:, :4], **opts)
        h2, M2 = mpn_engine.plastic_forward(x[:, 4:], **opts, m_init=M1)
        zero = mpn_engine.plastic_forward(x, **opts, m_init=torch.zeros_like(M))
    assert M1.abs().max() > 0
    assert torch.equal(torch.cat([h1, h2], dim=1), h) and torch.equal(M2, M)
    assert torch.equal(zero[0], h) and torch.equal(zero[1], M)


def test_m_init_is_refused_with_a_gradient_or_w_rec():
    args, masks = make_inputs(recurrent=True)
    M0 = torch.zeros(args["x"].shape[0], N_POST, N_PRE, dtype=args["x"].dtype)
    for engine in FAST:
        with pytest.raises(ValueError, match="m_init"):
            mpn_engine.plastic_forward(**args, **masks, engine=engine, m_init=M0)


@pytest.mark.parametrize("grad", [False, True])
def test_record_sees_the_same_M_history(grad):
    args, masks = make_inputs(recurrent=True, m_freeze="per_trial")
    seen = {}
    for engine in ("reference", "fast", "fused"):
        Ms = []  # stored without copying: each step must hand over its own tensor
        with torch.set_grad_enabled(grad):
            h, _ = mpn_engine.plastic_forward(**args, **masks, engine=engine,
                                              record=lambda t, M: Ms.append((t, M)))
        assert [t for t, _ in Ms] == list(range(args["x"].shape[1]))
        assert h.requires_grad == grad
        seen[engine] = [M.detach() for _, M in Ms]
    assert seen["reference"][0].abs().max() == 0  # M_{-1} = 0
    assert_close(seen["fast"], seen["reference"], 1e-9)
    assert_close(seen["fused"], seen["reference"], 1e-9)
    if grad:  # the recorded forward still trains
        args2, masks2 = make_inputs(recurrent=True, m_freeze="per_trial")
        for engine in ("fast", "fused"):
            got = run(engine, args2, masks2, record=lambda t, M: None)
            assert_close(got, run("reference", args2, masks2), 1e-9)


@pytest.mark.parametrize("engine", ["fast", "fused"])
def test_gradcheck_custom_function(engine):
    args, masks = make_inputs(B=2, T=4, eta_kind="matrix", lam_kind="pre", eta_scale=1.5,
                              recurrent=True, hid_mask=True, m_freeze="shared")
    names = [k for k, v in args.items() if v is not None]

    def f(*tensors):
        kw = dict(zip(names, tensors))
        return mpn_engine.plastic_forward(**kw, **masks, engine=engine)

    assert torch.autograd.gradcheck(f, [args[k] for k in names], eps=1e-6, atol=1e-7)


def test_auto_picks_cpp_when_it_can_and_reference_otherwise():
    args, masks = make_inputs()
    assert_close(run("auto", args, masks), run("cpp", args, masks), 0.0)
    # a mask that requires grad is outside the fast engine: auto falls back, fast refuses
    masks = dict(hid_mask=torch.ones(3, N_POST, dtype=torch.float64, requires_grad=True))
    assert mpn_engine.fast_unsupported(**args, **masks) is not None
    h, _ = mpn_engine.plastic_forward(**args, **masks, engine="auto")
    h.sum().backward()
    assert masks["hid_mask"].grad is not None
    for engine in ("fast", "cpp", "fused"):
        with pytest.raises(ValueError, match=f"engine '{engine}' cannot run"):
            mpn_engine.plastic_forward(**args, **masks, engine=engine)
    with pytest.raises(ValueError, match="unknown engine"):
        mpn_engine.plastic_forward(**args, engine="nope")


def test_engines_listed():
    assert set(mpn_engine.ENGINES) == {"reference", "fast", "cpp", "fused", "auto"}


# ---------------------------------------------------------------------------------------
# Engine "fused" compiled (torch.compile; inductor's C++ backend here, Triton on a GPU):
# compiling keeps the answer, a new trial length or new parameter values compile nothing
# new, and a failed compile falls back to the same functions uncompiled.

@pytest.fixture
def fused_compiled(monkeypatch):
    monkeypatch.setattr(mpn_fused, "COMPILE", True)
    monkeypatch.setitem(mpn_fused._state, "error", None)
    yield
    if mpn_fused._state["error"] is not None:
        pytest.skip(f"torch.compile unavailable here: {mpn_fused._state['error']}")


@pytest.mark.parametrize("case,dtype,tol,opts", [
    ("everything", torch.float64, 1e-9, dict()),
    ("kernel_all", torch.float32, 1e-5, dict(mp_type="add", m_update="hebb_pre",
                                            m_bounds=(-0.5, 0.8)))])
def test_fused_compiled_matches_reference(case, dtype, tol, opts, fused_compiled):
    from torch._dynamo.utils import counters
    eta_scale = 3.0 if dtype == torch.float64 else 2.0  # see test_kernel_used_and_segments
    args, masks = make_inputs(**dict(OPTION_CASES[case], eta_scale=eta_scale), B=4, T=8,
                              dtype=dtype)
    assert clip_binds(args, masks, **opts)
    before = counters["stats"]["unique_graphs"]
    assert_close(run("fused", args, masks, **opts), run("reference", args, masks, **opts), tol)
    assert mpn_fused._state["error"] is None
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > before  # compiled (the forward and reverse steps), not run eagerly
    # another trial length and other parameter values: the same graphs serve
    args, masks = make_inputs(**dict(OPTION_CASES[case], eta_scale=eta_scale), B=4, T=11,
                              dtype=dtype, seed=1)
    assert_close(run("fused", args, masks, **opts), run("reference", args, masks, **opts), tol)
    assert counters["stats"]["unique_graphs"] == graphs


def test_fused_falls_back_uncompiled_when_compile_fails(monkeypatch, caplog):
    def broken(fn, **kw):
        def fail(*a, **k):
            raise RuntimeError("no compiler here")
        return fail
    monkeypatch.setattr(mpn_fused, "COMPILE", True)
    monkeypatch.setitem(mpn_fused._state, "error", None)
    monkeypatch.setitem(mpn_fused._state, "compiled", {})
    monkeypatch.setattr(torch, "compile", broken)
    args, masks = make_inputs(**OPTION_CASES["kernel_all"])
    with caplog.at_level("WARNING", logger="mpn_fused"):
        got = run("fused", args, masks)
    assert_close(got, run("reference", args, masks), 1e-9)
    assert "no compiler here" in mpn_fused._state["error"]
    assert "torch.compile failed" in caplog.text


# ---------------------------------------------------------------------------------------
# The compiled kernel (engine "cpp"): really used where it applies, its segment
# checkpointing, and the silent fallback to "fast" when it cannot be built.

@pytest.fixture
def kernel_only(monkeypatch):
    """Fail if engine 'cpp' hands the call to 'fast'; skip where the kernel cannot be built."""
    if mpn_cpp.kernel() is None:
        pytest.skip(f"compiled kernel unavailable: {mpn_cpp._state['error']}")

    def refuse(*a, **k):
        raise AssertionError("engine 'cpp' fell back to 'fast'")
    monkeypatch.setattr(mpn_engine, "plastic_forward_fast", refuse)


def test_kernel_tanh_is_correctly_rounded_in_float32(kernel_only):
    """The kernel's own vectorised float tanh: one step with W = 0 gives h = tanh(b), so a
    bias grid checks it against tanh in float64, within 0.5 ulp (+ a little) everywhere."""
    b32 = torch.cat([torch.linspace(-12, 12, 200_001), torch.logspace(-30, 0, 2_001),
                     -torch.logspace(-30, 0, 2_001), torch.tensor([0.0, -0.0, 0.625, 10.0, 80.0,
                                                                   float("inf"), -float("inf")])])
    n = b32.numel()
    x, W = torch.ones(1, 1, 1), torch.zeros(n, 1)
    with torch.no_grad():
        h, _ = mpn_engine.plastic_forward(x, W, b32, torch.tensor(1.0), torch.tensor(0.99),
                                          engine="cpp")
    got, want = h[0, 0].double(), torch.tanh(b32.double())
    ulp = torch.from_numpy(np.spacing(want.abs().float().numpy())).double()
    assert ((got - want).abs() / ulp).max().item() <= 0.501
    nonzero = b32 != 0
    assert torch.equal(torch.sign(h[0, 0][nonzero]), torch.sign(b32[nonzero]))
    h_nan, _ = mpn_engine.plastic_forward(x, torch.zeros(2, 1), torch.tensor([float("nan"), 1.0]),
                                          torch.tensor(1.0), torch.tensor(0.99), engine="cpp")
    assert torch.isnan(h_nan[0, 0, 0]) and not torch.isnan(h_nan[0, 0, 1])


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
@pytest.mark.parametrize("case", ["kernel_all", "lam_fixed", "recurrent", "freeze_fractional"])
@pytest.mark.parametrize("seg_bytes", [1, 3 * N_PRE * N_POST * 8, 1 << 30])
def test_kernel_used_and_segments(case, dtype, tol, seg_bytes, kernel_only, monkeypatch):
    """Segments of 1, 3 (float64; 6 in float32) and all T steps between checkpoints. In
    float32, η is scaled by 2 rather than 3: at 3 these trajectories are chaotic enough that
    float32 rounding alone, amplified ~2x per step, moves any two summation orders (reference
    vs fast, too) ~1e-5 apart; at 2 the clip still binds."""
    monkeypatch.setattr(mpn_cpp, "SEG_BYTES", seg_bytes)
    eta_scale = 3.0 if dtype == torch.float64 else 2.0
    args, masks = make_inputs(**dict(OPTION_CASES[case], eta_scale=eta_scale), B=4, T=8,
                              dtype=dtype)
    for opts in (dict(), dict(mp_type="add", m_update="hebb_pre", m_bounds=(-0.5, 0.8))):
        assert clip_binds(args, masks, **opts)
        want = run("reference", args, masks, **opts)
        assert_close(run("cpp", args, masks, **opts), want, tol)
        assert_close(run("auto", args, masks, **opts), want, tol)


@pytest.mark.parametrize("seg_bytes", [3 * N_PRE * N_POST * 4, 1 << 30])
def test_kernel_result_does_not_depend_on_its_threads(seg_bytes, kernel_only, monkeypatch):
    """Trials handed to 1, 2 or 3 kernel threads (forward), and the backward's recompute of the
    next trial on a second thread (whole history in one segment) or none (several segments):
    bit-identical outputs and gradients, so a run's result never depends on the machine's
    core count or load."""
    monkeypatch.setattr(mpn_cpp, "SEG_BYTES", seg_bytes)
    args, masks = make_inputs(**OPTION_CASES["kernel_all"], B=5, T=9, dtype=torch.float32)
    results = []
    for n in ("1", "2", "3"):
        monkeypatch.setenv("MPN_KERNEL_THREADS", n)
        assert mpn_cpp.threads() == int(n)
        results.append(run("cpp", args, masks))
        with torch.no_grad():
            results[-1] += list(mpn_engine.plastic_forward(**args, **masks, engine="cpp"))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    assert_close(results[0][:len(results[0]) - 2], run("reference", args, masks), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seg_bytes", [3 * 40 * 24 * 8, 1 << 30])
@pytest.mark.parametrize("lam_kind", ["scalar", "pre"])
def test_kernel_row_bands_are_bit_identical_to_one_thread(dtype, seg_bytes, lam_kind,
                                                          kernel_only, monkeypatch):
    """N_post = 40 (row blocks of 16, 16 and 8): on 2 and 3 threads the backward splits the
    rows into bands, one thread each, handing the sums over rows from band to band. Outputs
    and gradients equal one thread's bit for bit (a loss on h and M, and one on h alone over
    unpadded steps, which skips the padded tails), and the reference engine's values;
    frozen-M and hidden masks, a trainable λ per presynaptic unit (λ's column gradient is a
    sum over rows too), segments of 3 steps and of the whole sequence."""
    monkeypatch.setattr(mpn_cpp, "SEG_BYTES", seg_bytes)
    g = torch.Generator().manual_seed(3)
    B, T, n_pre, n_post = 5, 9, 24, 40
    x = torch.tanh(2 * torch.randn(B, T, n_pre, generator=g, dtype=dtype))
    real = (torch.arange(T)[None, :] < torch.tensor([9, 4, 9, 1, 6])[:, None]).to(dtype)
    x = (x * real[:, :, None]).requires_grad_()
    lam_shape = () if lam_kind == "scalar" else (1, n_pre)
    args = dict(x=x,
                W=(torch.randn(n_post, n_pre, generator=g, dtype=dtype) / 3).requires_grad_(),
                b=torch.randn(n_post, generator=g, dtype=dtype).requires_grad_(),
                eta=(2.0 + 0.3 * torch.randn(1, n_pre, generator=g, dtype=dtype)).requires_grad_(),
                lam=(0.9 + 0.09 * torch.rand(lam_shape, generator=g, dtype=dtype)).requires_grad_(),
                W_rec=None)
    masks = dict(hid_mask=(torch.rand(B, n_post, generator=g) > 0.2).to(dtype),
                 m_freeze=(torch.rand(B, n_post, n_pre, generator=g) > 0.8).to(dtype))
    inputs = [t for t in args.values() if t is not None]

    def both_losses(engine):
        h, M = mpn_engine.plastic_forward(**args, **masks, engine=engine)
        wh = torch.cos(torch.arange(h.numel(), dtype=dtype)).view_as(h)
        wM = torch.sin(torch.arange(M.numel(), dtype=dtype)).view_as(M)
        full = torch.autograd.grad((h * wh).sum() + (M * wM).sum(), inputs, retain_graph=True)
        tail_free = torch.autograd.grad((h * wh * real[:, :, None]).sum(), inputs)
        return [h.detach(), M.detach(), *full, *tail_free]

    results = []
    for n in ("1", "2", "3"):
        monkeypatch.setenv("MPN_KERNEL_THREADS", n)
        results.append(both_losses("cpp"))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    assert_close(results[0], both_losses("reference"), 1e-9 if dtype == torch.float64 else 1e-5)


def test_using_threads_overrides_the_environment_inside_its_block_only(kernel_only,
                                                                      monkeypatch):
    monkeypatch.setenv("MPN_KERNEL_THREADS", "3")
    args, masks = make_inputs(B=5, T=9, dtype=torch.float32)
    args = {k: None if v is None else v.detach() for k, v in args.items()}
    with torch.no_grad():
        outside = mpn_engine.plastic_forward(**args, **masks, engine="cpp")
        with mpn_cpp.using_threads(2):
            assert mpn_cpp.threads() == 2
            with mpn_cpp.using_threads(0):  # 0: as outside the block
                assert mpn_cpp.threads() == 2
            inside = mpn_engine.plastic_forward(**args, **masks, engine="cpp")
    assert mpn_cpp.threads() == 3
    assert all(torch.equal(a, b) for a, b in zip(outside, inside))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("m_freeze", [None, "per_trial"])
def test_kernel_lambda_without_column_factor_takes_the_general_path_bits(dtype, m_freeze,
                                                                         kernel_only):
    """A scalar λ (column factor all ones: the kernel's one-multiply-less M update) and the
    same λ given per presynaptic unit ((1, N_pre): row factor ones, the general update
    λ_i λ_j M) give the same h and M bit for bit, with and without a frozen-M mask."""
    args, masks = make_inputs(B=4, T=9, m_freeze=m_freeze, dtype=dtype)
    args = {k: None if v is None else v.detach() for k, v in args.items()}
    with torch.no_grad():
        one = mpn_engine.plastic_forward(**args, **masks, engine="cpp")
        per_pre = mpn_engine.plastic_forward(**dict(args, lam=args["lam"].expand(1, N_PRE)),
                                             **masks, engine="cpp")
    assert one[1].abs().max() > 0
    assert torch.equal(one[0], per_pre[0]) and torch.equal(one[1], per_pre[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seg_bytes", [3 * N_PRE * N_POST * 4, 1 << 30])
@pytest.mark.parametrize("m_freeze", [None, "per_trial"])
def test_kernel_skips_a_padded_tail_bit_for_bit(dtype, seg_bytes, m_freeze, kernel_only,
                                                monkeypatch):
    """Trials padded with zero input after their own end (lengths 10, 6, 3, 0 of T = 10) and a
    loss that ignores the padding: the kernel runs the tail's forward without its dot
    products and skips it in the backward. A zero W_rec makes it run every step in full
    (trial_end), and gives the same h, M and gradients bit for bit; a loss that reads the
    padded steps too (dL/dh ≠ 0 there) is not skipped: both match the reference engine.
    Segments of 3 and of the whole sequence, with 2 threads (the recompute beside the reverse
    pass)."""
    monkeypatch.setattr(mpn_cpp, "SEG_BYTES", seg_bytes)
    monkeypatch.setenv("MPN_KERNEL_THREADS", "2")
    args, masks = make_inputs(B=4, T=10, m_freeze=m_freeze, dtype=dtype,
                              eta_scale=3.0 if dtype == torch.float64 else 2.0)
    lengths = torch.tensor([10, 6, 3, 0])
    real = (torch.arange(10)[None, :] < lengths[:, None]).to(dtype)  # (B, T)
    with torch.no_grad():
        args["x"].mul_(real[:, :, None])

    def padded_run(engine, W_rec=None, masked=True):
        h, M = mpn_engine.plastic_forward(**dict(args, W_rec=W_rec), **masks, engine=engine)
        wh = torch.cos(torch.arange(h.numel(), dtype=h.dtype)).view_as(h)
        if masked:
            wh = wh * real[:, :, None]
        inputs = [t for t in args.values() if t is not None and t.requires_grad]
        return [h.detach(), M.detach(), *torch.autograd.grad((h * wh).sum(), inputs)]

    skipped = padded_run("cpp")
    every_step = padded_run("cpp", W_rec=torch.zeros(N_POST, N_POST, dtype=dtype))
    assert all(torch.equal(a, b) for a, b in zip(skipped, every_step))
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert_close(skipped, padded_run("reference"), tol)
    assert skipped[1][3].abs().max() == 0 and skipped[1][2].abs().max() > 0  # M decays, kept
    assert_close(padded_run("cpp", masked=False), padded_run("reference", masked=False), tol)


def test_kernel_no_grad_and_default_training_config(kernel_only):
    """Paper defaults (mult, hebb_assoc, scalar trainable η, fixed λ = 0.99, clip ±1) at a
    size where the trials spread over the threads."""
    g = torch.Generator().manual_seed(1)
    x = torch.tanh(torch.randn(9, 12, 16, generator=g, dtype=torch.float64)).requires_grad_()
    W = (0.3 * torch.randn(16, 16, generator=g, dtype=torch.float64)).requires_grad_()
    b = (0.1 * torch.randn(16, generator=g, dtype=torch.float64)).requires_grad_()
    eta = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    args = dict(x=x, W=W, b=b, eta=eta, lam=torch.tensor(0.99, dtype=torch.float64),
                W_rec=None)
    assert_close(run("cpp", args, {}), run("reference", args, {}), 1e-9)
    with torch.no_grad():
        got = mpn_engine.plastic_forward(**args, engine="cpp")
        want = mpn_engine.plastic_forward(**args, engine="reference")
    assert_close(list(got), list(want), 1e-9)


def test_kernel_build_failure_falls_back_to_fast(monkeypatch, caplog):
    """No compiler / ninja: 'cpp' and 'auto' silently run 'fast', with one logged warning."""
    import torch.utils.cpp_extension as cpp_extension

    def broken(*a, **k):
        raise RuntimeError("Ninja is required to load C++ extensions")
    monkeypatch.setattr(cpp_extension, "load", broken)
    monkeypatch.delenv("MPN_CPP", raising=False)
    monkeypatch.setattr(mpn_cpp, "_state", dict(module=None, tried=False, error=None,
                                                build_s=None))
    args, masks = make_inputs(recurrent=True, hid_mask=True)
    with caplog.at_level("WARNING", logger="mpn_cpp"):
        for engine in ("cpp", "auto", "cpp"):
            assert_close(run(engine, args, masks), run("fast", args, masks), 0.0)
    assert mpn_cpp.kernel() is None and "Ninja is required" in mpn_cpp._state["error"]
    assert len([r for r in caplog.records if r.name == "mpn_cpp"]) == 1


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(monkeypatch, tmp_path, caplog):
    """A killed build leaves torch's `lock` file, on which every later build would wait
    forever: one older than STALE_LOCK_S is removed (and said), a younger one (a build
    running now) is left alone."""
    import torch.utils.cpp_extension as cpp_extension
    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path))
    lock = tmp_path / "lock"
    lock.write_text("")
    assert not mpn_cpp._clear_stale_lock("x") and lock.exists()  # a build may be running
    old = time.time() - mpn_cpp.STALE_LOCK_S - 5
    os.utime(lock, (old, old))
    with caplog.at_level("WARNING", logger="mpn_cpp"):
        assert mpn_cpp._clear_stale_lock("x")
    assert not lock.exists() and "interrupted build" in caplog.text
    assert not mpn_cpp._clear_stale_lock("x")  # no lock: nothing to do


def test_kernel_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("MPN_CPP", "0")
    monkeypatch.setattr(mpn_cpp, "_state", dict(module=None, tried=False, error=None,
                                                build_s=None))
    assert mpn_cpp.kernel() is None
    args, masks = make_inputs()
    assert_close(run("cpp", args, masks), run("fast", args, masks), 0.0)


def test_kernel_unsupported_calls_go_to_fast():
    args, masks = make_inputs(eta_kind="matrix", per_trial_W=True)
    assert mpn_cpp.unsupported(**args, **masks) is not None
    assert_close(run("cpp", args, masks), run("reference", args, masks), 1e-9)


def test_kernel_gradcheck(kernel_only):
    args, masks = make_inputs(B=2, T=4, eta_kind="post", lam_kind="pre", eta_scale=1.5,
                              recurrent=True, hid_mask=True, m_freeze="shared")
    names = [k for k, v in args.items() if v is not None]

    def f(*tensors):
        return mpn_engine.plastic_forward(**dict(zip(names, tensors)), **masks, engine="cpp")

    assert torch.autograd.gradcheck(f, [args[k] for k in names], eps=1e-6, atol=1e-7)


def test_kernel_empty_sequence_goes_to_fast():
    args, masks = make_inputs(T=1)
    args["x"] = args["x"][:, :0].detach().requires_grad_()
    assert mpn_cpp.unsupported(**args, **masks) is not None
    h, M = mpn_engine.plastic_forward(**args, **masks, engine="cpp")
    assert h.shape == (3, 0, N_POST) and M.abs().max() == 0


def test_fused_step_that_fails_uncompiled_too_raises_and_keeps_compiling(monkeypatch):
    """A call wrong in itself is not a compiler failure: it raises, and later calls still
    compile."""
    def wrong(x):
        raise ValueError("bad call")
    monkeypatch.setattr(mpn_fused, "COMPILE", True)
    monkeypatch.setitem(mpn_fused._state, "error", None)
    monkeypatch.setitem(mpn_fused._state, "compiled", {"wrong": wrong})
    with pytest.raises(ValueError, match="bad call"):
        mpn_fused._step(wrong, torch.zeros(1))
    assert mpn_fused._state["error"] is None
