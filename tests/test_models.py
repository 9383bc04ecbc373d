"""Models against plain per-step loops written here straight from SPEC §1.1-1.2 (float64),
gradients, gradcheck, parameter count, λ clamp, loss, evaluate and checkpoints.

Every dmpn equality test runs once per engine in mpn_engine.ENGINES, so a new engine is
tested as soon as it is registered there. Axis order: (B, T, N).
"""
import itertools
import math

import numpy as np
import pytest
import torch

import helper
import mpn
import mpn_engine
import mpn_tasks
import net_helpers as nh

ENGINES = list(mpn_engine.ENGINES)
DT = torch.float64
TOL = dict(atol=1e-10, rtol=1e-10)

# ----------------------------------------------------------------------------------------
# The option grid: a greedy all-pairs covering set of the full product (every value of every
# option meets every value of every other option in at least one case).

OPTIONS = {
    "mp_type": ["mult", "add"],
    "m_update": ["hebb_assoc", "hebb_pre"],
    "eta_type": list(mpn.COEF_TYPES),
    "lam_type": list(mpn.COEF_TYPES),
    "recurrent": [False, True],
    "input_layer": [True, False],
    "m_bounds": [(-1.0, 1.0), None, (-0.3, 0.5)],
    "eta_train": [True, False],
    "lam_train": [False, True],
}


def pairwise_cases(options):
    keys = list(options)
    full = [dict(zip(keys, vals)) for vals in itertools.product(*options.values())]

    def pairs(case):
        return {(a, repr(case[a]), b, repr(case[b])) for a, b in itertools.combinations(keys, 2)}

    todo = set().union(*(pairs(c) for c in full))
    cases = []
    while todo:
        best = max(full, key=lambda c: len(pairs(c) & todo))
        cases.append(best)
        todo -= pairs(best)
    return cases


CASES = pairwise_cases(OPTIONS)


def case_id(c):
    return "-".join(str(v).replace(" ", "") for v in c.values())


def randomise(net, gen, eta_scale=1.0):
    """Random values for every parameter and buffer, so each η / λ shape really matters."""
    with torch.no_grad():
        for name, p in itertools.chain(net.named_parameters(), net.named_buffers()):
            if name.endswith("eta"):
                p.copy_(eta_scale * (0.3 + 1.5 * torch.rand(p.shape, generator=gen, dtype=DT)))
            elif name.endswith("lam"):
                p.copy_(0.5 + 0.49 * torch.rand(p.shape, generator=gen, dtype=DT))
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=DT) * 0.8)


def make_dmpn(case, engine, n_input=5, n_hidden=7, seed=0, eta_scale=1.0):
    net = mpn.build_model("dmpn", n_input=n_input, n_hidden=n_hidden, n_output=3, seed=seed,
                          engine=engine, **case).to(DT)
    randomise(net, torch.Generator().manual_seed(seed + 1), eta_scale)
    return net


def rand_inputs(B=3, T=7, n_in=5, seed=0):
    return torch.randn(B, T, n_in, generator=torch.Generator().manual_seed(seed), dtype=DT)


# ----------------------------------------------------------------------------------------
# Plain loops, one trial and one step at a time, straight from the SPEC equations.


def spec_dmpn(net, u, case):
    """SPEC §1.1: x_t = tanh(W_in u_t); h_t = tanh(W_eff x_t + b [+ W_rec h_{t-1}]);
    y_t = W_out h_t; M_t = clip(λ M_{t-1} + η post_t x_tᵀ)."""
    mp = net.mp
    W, b, W_out, W_rec = mp.W, mp.b, net.W_out, mp.W_rec
    n_post, n_pre = W.shape
    eta, lam = mp.eta.expand(n_post, n_pre), mp.lam.expand(n_post, n_pre)
    ys, hs, Ms = [], [], []
    for trial in range(u.shape[0]):
        M = torch.zeros(n_post, n_pre, dtype=DT)
        h = torch.zeros(n_post, dtype=DT)
        y_tr, h_tr = [], []
        for t in range(u.shape[1]):
            x = torch.tanh(net.W_in @ u[trial, t]) if case["input_layer"] else u[trial, t]
            W_eff = W * (1 + M) if case["mp_type"] == "mult" else W + M
            a = W_eff @ x + b
            if case["recurrent"]:
                a = a + W_rec @ h
            h = torch.tanh(a)
            post = h if case["m_update"] == "hebb_assoc" else torch.full_like(h, n_post ** -0.5)
            M = lam * M + eta * torch.outer(post, x)
            if case["m_bounds"] is not None:
                M = torch.clamp(M, *case["m_bounds"])
            y_tr.append(W_out @ h)
            h_tr.append(h)
        ys.append(torch.stack(y_tr))
        hs.append(torch.stack(h_tr))
        Ms.append(M)
    return torch.stack(ys), torch.stack(hs), torch.stack(Ms)


def spec_vanilla(net, u, alpha=0.2):
    out_y, out_h = [], []
    for trial in range(u.shape[0]):
        h = torch.zeros(net.W_rec.shape[0], dtype=DT)
        hs = []
        for t in range(u.shape[1]):
            h = (1 - alpha) * h + alpha * torch.tanh(net.W_in @ u[trial, t] + net.W_rec @ h + net.b)
            hs.append(h)
        out_h.append(torch.stack(hs))
        out_y.append(out_h[-1] @ net.W_out.T)
    return torch.stack(out_y), torch.stack(out_h)


def spec_gru(net, u):
    N = net.W_out.shape[1]
    Wi, Wh, bi, bh = net.W_in, net.W_rec, net.b_in, net.b_rec
    blk = lambda v, k: v[k * N:(k + 1) * N]  # noqa: E731  (gate block k: r, z, n)
    out_y, out_h = [], []
    for trial in range(u.shape[0]):
        h = torch.zeros(N, dtype=DT)
        hs = []
        for t in range(u.shape[1]):
            x = u[trial, t]
            r = torch.sigmoid(blk(Wi, 0) @ x + blk(bi, 0) + blk(Wh, 0) @ h + blk(bh, 0))
            z = torch.sigmoid(blk(Wi, 1) @ x + blk(bi, 1) + blk(Wh, 1) @ h + blk(bh, 1))
            n = torch.tanh(blk(Wi, 2) @ x + blk(bi, 2) + r * (blk(Wh, 2) @ h + blk(bh, 2)))
            h = (1 - z) * n + z * h
            hs.append(h)
        out_h.append(torch.stack(hs))
        out_y.append(out_h[-1] @ net.W_out.T)
    return torch.stack(out_y), torch.stack(out_h)


def scalar_loss(tensors, seed=5):
    g = torch.Generator().manual_seed(seed)
    return sum((t * torch.randn(t.shape, generator=g, dtype=DT)).sum() for t in tensors)


def assert_grads_equal(net, model_tensors, spec_tensors):
    params = [p for p in net.parameters() if p.requires_grad]
    g_model = torch.autograd.grad(scalar_loss(model_tensors), params)
    g_spec = torch.autograd.grad(scalar_loss(spec_tensors), params)
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, g_model, g_spec):
        torch.testing.assert_close(a, b, **TOL, msg=f"gradient of {name} differs")


# ----------------------------------------------------------------------------------------
# dmpn


def test_grid_covers_every_pair():
    assert len(CASES) < 40
    for a, b in itertools.combinations(OPTIONS, 2):
        seen = {(repr(c[a]), repr(c[b])) for c in CASES}
        assert len(seen) == len(OPTIONS[a]) * len(OPTIONS[b])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_dmpn_matches_spec_loop(case, engine):
    n_in = 5
    net = make_dmpn(case, engine, n_input=n_in)
    u = rand_inputs(n_in=n_in)
    out = net(u)
    y, h, M = spec_dmpn(net, u, case)
    torch.testing.assert_close(out["y"], y, **TOL)
    torch.testing.assert_close(out["h"], h, **TOL)
    torch.testing.assert_close(out["M_final"], M, **TOL)
    assert_grads_equal(net, (out["y"], out["h"], out["M_final"]), (y, h, M))


@pytest.mark.parametrize("engine", ENGINES)
def test_m_clip_binds(engine):
    case = dict(CASES[0], m_bounds=(-1.0, 1.0), mp_type="mult", m_update="hebb_assoc")
    net = make_dmpn(case, engine, eta_scale=5.0)
    u = rand_inputs()
    out = net(u, record=("M",))
    y, h, M = spec_dmpn(net, u, case)
    assert (out["M"].abs() == 1.0).float().mean() > 0.05  # the clip is active
    torch.testing.assert_close(out["M_final"], M, **TOL)
    torch.testing.assert_close(out["y"], y, **TOL)
    unclipped = make_dmpn(dict(case, m_bounds=None), engine, eta_scale=5.0)
    assert out["M_final"].abs().max() <= 1.0
    assert unclipped(u)["M_final"].abs().max() > 1.5
    assert_grads_equal(net, (out["y"], out["M_final"]), (y, M))


@pytest.mark.parametrize("engine", ENGINES)
def test_record_m_history_is_m_prev(engine):
    case = CASES[1]
    net = make_dmpn(case, engine)
    u = rand_inputs()
    seen = []
    out = net(u, record=("x", "M"), m_reduce=lambda t, M: seen.append((t, M.abs().sum())))
    assert out["M"].shape == (3, 7, 7, out["x"].shape[-1])
    assert torch.all(out["M"][:, 0] == 0)  # M_{-1} = 0: the matrix used at step 0
    for T in range(1, 7):  # M_{t-1} equals the final M of the trial cut after t steps
        torch.testing.assert_close(out["M"][:, T], net(u[:, :T])["M_final"], **TOL)
    assert [t for t, _ in seen] == list(range(7))
    torch.testing.assert_close(torch.stack([s for _, s in seen]), out["M"].abs().sum((0, 2, 3)))


@pytest.mark.parametrize("engine", ENGINES)
def test_gradcheck_tiny(engine):
    case = dict(mp_type="mult", m_update="hebb_assoc", eta_type="matrix", lam_type="post_vector",
                recurrent=True, input_layer=True, m_bounds=None, eta_train=True, lam_train=True)
    net = make_dmpn(case, engine, n_input=2, n_hidden=3)
    u = rand_inputs(B=2, T=3, n_in=2)
    names = [n for n, p in net.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in net.parameters())

    def f(*ps):
        out = torch.func.functional_call(net, dict(zip(names, ps)), (u,))
        return out["y"], out["M_final"]

    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-7)


def test_default_parameter_count_and_init():
    net = mpn.build_model("dmpn", n_hidden=300, seed=749)
    assert net.n_trainable() == 97501
    assert net.mp.eta.item() == 1.0 and not net.mp.lam.requires_grad
    assert float(net.mp.lam) == pytest.approx(0.99)
    a = math.sqrt(6 / (300 + 21))
    assert net.W_in.abs().max() <= a and net.W_in.abs().max() > 0.95 * a
    assert abs(net.mp.b.detach().std().item() - 300 ** -0.5) < 0.01
    same = mpn.build_model("dmpn", n_hidden=300, seed=749)
    other = mpn.build_model("dmpn", n_hidden=300, seed=750)
    assert torch.equal(net.mp.W, same.mp.W) and not torch.equal(net.mp.W, other.mp.W)
    rec = mpn.build_model("dmpn", n_hidden=300, seed=749, recurrent=True)
    assert torch.equal(rec.W_out, net.W_out)  # an option never reshuffles the other weights
    assert [w.shape for w in rec.weight_params()] == [(300, 21), (300, 300), (3, 300), (300, 300)]


def test_lambda_clamp_and_eta_never_clamped():
    case = dict(CASES[0], lam_type="matrix", lam_train=True, eta_train=True)
    net = make_dmpn(case, "reference")
    with torch.no_grad():
        net.mp.eta.fill_(7.0)
        net.mp.lam[0, 0] = 1.5
        net.mp.lam[1, 1] = -0.2
    net.clamp_parameters()
    assert net.mp.lam[0, 0].item() == pytest.approx(1 - 40 / 4000)
    assert net.mp.lam[1, 1].item() == 0.0
    assert torch.all(net.mp.eta == 7.0)


def test_bad_options_are_clear():
    with pytest.raises(ValueError, match="eta_type|coefficient type"):
        mpn.build_model("dmpn", n_hidden=4, eta_type="tensor")
    with pytest.raises(ValueError, match="mp_type"):
        mpn.build_model("dmpn", n_hidden=4, mp_type="both")
    with pytest.raises(ValueError, match="unknown net"):
        mpn.build_model("lstm")


# ----------------------------------------------------------------------------------------
# Baselines


def make_baseline(kind, n_in=5, n_hidden=6):
    net = mpn.build_model(kind, n_input=n_in, n_hidden=n_hidden, n_output=3, seed=3).to(DT)
    randomise(net, torch.Generator().manual_seed(4))
    return net


@pytest.mark.parametrize("kind,spec", [("vanilla", spec_vanilla), ("gru", spec_gru)])
def test_baseline_matches_spec_loop(kind, spec):
    net = make_baseline(kind)
    u = rand_inputs()
    out = net(u)
    y, h = spec(net, u)
    torch.testing.assert_close(out["y"], y, **TOL)
    torch.testing.assert_close(out["h"], h, **TOL)
    assert_grads_equal(net, (out["y"], out["h"]), (y, h))


def test_gru_has_grucell_semantics():
    net = make_baseline("gru")
    cell = torch.nn.GRUCell(5, 6).to(DT)
    with torch.no_grad():
        cell.weight_ih.copy_(net.W_in)
        cell.weight_hh.copy_(net.W_rec)
        cell.bias_ih.copy_(net.b_in)
        cell.bias_hh.copy_(net.b_rec)
    u = rand_inputs()
    h = torch.zeros(3, 6, dtype=DT)
    hs = []
    for t in range(u.shape[1]):
        h = cell(u[:, t], h)
        hs.append(h)
    torch.testing.assert_close(net(u)["h"], torch.stack(hs, 1), **TOL)


def test_gru_fused_path_equals_its_perturbable_loop():
    """Unperturbed trials run torch's fused GRU; a neutral perturbation takes the explicit
    loop the lesions use: both give the same states and gradients."""
    net = make_baseline("gru")
    u = rand_inputs()
    fused = net(u)
    looped = net(u, perturbation=nh.Perturbation(hid_mask=torch.ones(6, dtype=DT)))
    torch.testing.assert_close(fused["h"], looped["h"], **TOL)
    assert_grads_equal(net, (fused["y"], fused["h"]), (looped["y"], looped["h"]))


@pytest.mark.parametrize("kind", ["dmpn", "vanilla", "gru"])
def test_hidden_state_is_per_trial(kind):
    net = make_dmpn(CASES[2], ENGINES[0]) if kind == "dmpn" else make_baseline(kind)
    u = rand_inputs(B=3)
    h = net(u)["h"]
    for i in range(3):  # each trial alone gives what it gives inside the batch
        torch.testing.assert_close(net(u[i:i + 1])["h"][0], h[i], **TOL)
    assert (h[0] - h[1]).abs().max() > 1e-3 and (h[1] - h[2]).abs().max() > 1e-3


def test_baseline_init_and_weights():
    van = mpn.build_model("vanilla", n_hidden=300)
    gru = mpn.build_model("gru", n_hidden=50)
    assert van.alpha == pytest.approx(0.2)
    assert [w.shape for w in van.weight_params()] == [(300, 21), (300, 300), (3, 300)]
    a = math.sqrt(6 / (50 + 21))  # Xavier per gate block
    assert gru.W_in.abs().max() <= a and gru.W_in[:50].abs().max() > 0.9 * a
    assert torch.all(gru.b_in == 0)


# ----------------------------------------------------------------------------------------
# Loss, evaluation


def test_compute_loss_matches_spec_formula():
    net = make_baseline("vanilla", n_in=4, n_hidden=5)
    B, T = 3, 6
    g = torch.Generator().manual_seed(0)
    out = {"y": torch.randn(B, T, 3, generator=g, dtype=DT),
           "h": torch.randn(B, T, 5, generator=g, dtype=DT)}
    mask = torch.randint(0, 3, (B, T, 3), generator=g).to(DT) * 2.0
    length = torch.tensor([6, 4, 2])
    valid = (torch.arange(T)[None] < length[:, None]).to(DT)
    batch_t = {"targets": torch.randn(B, T, 3, generator=g, dtype=DT), "mask": mask,
               "valid": valid, "length": length}
    total, parts = nh.compute_loss(out, batch_t, net, weight_reg=0.1, activity_reg=0.3)
    mse = (mask * (out["y"] - batch_t["targets"]) ** 2).sum() / (B * T * 3)
    wsum = sum((w ** 2).sum() for w in (net.W_in, net.W_rec, net.W_out))
    h_real = torch.cat([out["h"][i, :length[i]] for i in range(B)])
    expect = mse + 0.05 * wsum + 0.3 * (h_real ** 2).mean()
    torch.testing.assert_close(total, expect, **TOL)
    torch.testing.assert_close(parts["mse"], mse, **TOL)


def test_evaluate_chunked_equals_whole():
    mpn_tasks = pytest.importorskip("mpn_tasks")
    rng = np.random.default_rng(0)
    batch = mpn_tasks.concat_batches([mpn_tasks.random_batch(r, 6, rng)
                                      for r in mpn_tasks.RULES[:3]])
    net = mpn.build_model("dmpn", n_hidden=16, seed=1)
    params = {k: v.clone() for k, v in net.state_dict().items()}
    whole = nh.evaluate(net, batch)
    chunked = nh.evaluate(net, batch, chunk_size=5)
    assert whole["loss"] == pytest.approx(chunked["loss"], rel=1e-6)
    for m in ("angle", "trial"):
        assert set(whole["acc"][m]) == set(mpn_tasks.RULES[:3])
        for r in whole["acc"][m]:
            assert whole["acc"][m][r] == pytest.approx(chunked["acc"][m][r])
    bt = nh.batch_to_torch(batch, "cpu", torch.float32)
    with torch.no_grad():
        total, parts = nh.compute_loss(net(bt["inputs"]), bt, net)
    assert whole["loss"] == pytest.approx(float(total), rel=1e-5)
    assert whole["loss_mse"] == pytest.approx(float(parts["mse"]), rel=1e-5)
    assert all(torch.equal(v, params[k]) for k, v in net.state_dict().items())


# ----------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize("kind", ["dmpn", "vanilla", "gru"])
def test_checkpoint_round_trip(tmp_path, kind):
    kwargs = dict(n_hidden=12, seed=2)
    if kind == "dmpn":
        kwargs.update(eta_type="pre_vector", lam_train=True, m_bounds=None, recurrent=True)
    net = mpn.build_model(kind, **kwargs)
    np_rng, t_gen = np.random.default_rng(11), torch.Generator().manual_seed(12)
    np_rng.random(3)
    extra = {"rng_numpy": nh.rng_state(np_rng), "rng_torch": nh.rng_state(t_gen),
             "rng_global": torch.get_rng_state(), "sampler": [0.1, 0.9]}
    path = tmp_path / "ckpt.pt"
    nh.save_checkpoint(path, net, {"net": kind, "lr": 1e-3}, step=42, extra=extra)
    ckpt = nh.load_checkpoint(path)
    again = mpn.model_from_checkpoint(ckpt)
    u = torch.randn(2, 9, 21)
    assert torch.equal(net(u)["y"], again(u)["y"])
    assert ckpt["step"] == 42 and ckpt["config"]["lr"] == 1e-3
    assert again.init_args == net.init_args
    restored = np.random.default_rng(0)
    nh.set_rng_state(restored, ckpt["extra"]["rng_numpy"])
    assert np.array_equal(restored.random(4), np_rng.random(4))


@pytest.mark.parametrize("kind", ["dmpn", "vanilla", "gru"])
def test_synapse_weight_is_the_matrix_synapse_perturbations_act_on(kind):
    """w_mask zeroing every entry of synapse_weight() equals zeroing that matrix in place."""
    net = mpn.build_model(kind, n_hidden=6, seed=1, **({"input_layer": False} if kind == "dmpn"
                                                      else {}))
    W = net.synapse_weight()
    assert net.synapse_shape() == tuple(W.shape) == ((6, 21) if kind == "dmpn" else (6, 6))
    assert net.plastic == (kind == "dmpn") and net.rows_independent() == (kind == "dmpn")
    u = torch.randn(2, 7, 21)
    mask = torch.ones(net.synapse_shape())
    mask[1, :3] = 0.0
    with torch.no_grad():
        y = net(u, perturbation=nh.Perturbation(w_mask=mask))["y"]
        if kind == "gru":  # the same mask on each of the three gate blocks
            net.W_rec.mul_(torch.cat([mask] * 3))
        else:
            W.mul_(mask)
        assert torch.allclose(y, net(u)["y"], atol=1e-6)


def test_forward_rows_reruns_rows_as_the_whole_layer_runs_them():
    net = mpn.build_model("dmpn", n_hidden=8, seed=3, engine="reference")
    u = torch.randn(3, 9, 21)
    with torch.no_grad():
        out = net(u, record=("x",))
        rows = torch.tensor([6, 1, 4])
        b, eta, lam = net.plastic_coefficients()
        h, M = net.forward_rows(out["x"], net.synapse_weight()[rows], b[rows], eta, lam)
    assert torch.allclose(h, out["h"][:, :, rows], atol=1e-6)
    assert torch.allclose(M, out["M_final"][:, rows], atol=1e-6)


def test_bad_checkpoint_files_give_one_clear_sentence(tmp_path):
    net = mpn.build_model("dmpn", n_hidden=8)
    path = tmp_path / "ckpt.pt"
    nh.save_checkpoint(path, net, {}, step=0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(helper.StageError, match="unreadable.*multiple_task.py"):
        nh.load_checkpoint(path)
    with pytest.raises(helper.StageError, match="missing.*multiple_task.py"):
        nh.load_checkpoint(tmp_path / "nothing.pt")
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(helper.StageError, match="not a model checkpoint"):
        nh.load_checkpoint(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 17, 64, 300])
def test_tanh_of_runs_is_torch_tanh_bit_for_bit(n, dtype):
    """The embedding's tanh, evaluated once per run of equal rows, against torch.tanh: equal
    bits, forward and backward, on piecewise-constant rows with zero tails (a task batch's
    shape), on rows with no runs (its fallback), and through gradcheck."""
    gen = torch.Generator().manual_seed(n)

    def trial():  # 7 epochs of 1-8 steps each, then zeros, 40 steps in all
        rows = [torch.randn(1, n, generator=gen, dtype=dtype).expand(int(k), n)
                for k in torch.randint(1, 9, (7,), generator=gen)]
        rows = torch.cat(rows)[:40]
        return torch.cat([rows, rows.new_zeros(40 - len(rows), n)])

    z = torch.stack([trial() for _ in range(3)]) * 2
    starts = 1 + (z.reshape(-1, n)[1:] != z.reshape(-1, n)[:-1]).any(1).sum()
    assert starts < 0.5 * 120  # the runs path, not its fallback
    assert z.shape == (3, 40, n)
    noisy = torch.randn(3, 40, n, generator=gen, dtype=dtype)
    for inp in (z, noisy):
        a = inp.clone().requires_grad_(True)
        b = inp.clone().requires_grad_(True)
        ya, yb = mpn.tanh_of_runs(a), torch.tanh(b)
        assert torch.equal(ya, yb) and torch.equal(torch.signbit(ya), torch.signbit(yb))
        g = torch.randn(ya.shape, generator=gen, dtype=dtype)
        ya.backward(g)
        yb.backward(g)
        assert torch.equal(a.grad, b.grad)
    if dtype == torch.float64 and n <= 17:
        assert torch.autograd.gradcheck(mpn.tanh_of_runs, (z[:1, :12].clone().requires_grad_(True),))
        assert torch.autograd.gradgradcheck(mpn.tanh_of_runs,
                                            (z[:1, :12].clone().requires_grad_(True),))


def test_tanh_of_runs_takes_non_contiguous_input():
    z = torch.zeros(5, 6, 4)
    z[:, :3] = torch.randn(5, 1, 4)
    zt = z.transpose(0, 1)  # (6, 5, 4), rows no longer adjacent in memory
    assert torch.equal(mpn.tanh_of_runs(zt), torch.tanh(zt))
    assert torch.equal(mpn.tanh_of_runs(z.transpose(1, 2)), torch.tanh(z.transpose(1, 2)))


def test_dmpn_embedding_on_a_task_batch_is_torch_tanh():
    batch = mpn_tasks.mixed_batch(["dmsgo", "delaydm1", "fdgo"], 4, np.random.default_rng(0))
    net = mpn.build_model("dmpn", n_hidden=24, seed=1)
    u = torch.as_tensor(batch.inputs)
    out = net(u, record=("x",))
    assert torch.equal(out["x"], torch.tanh(u @ net.W_in.T))
