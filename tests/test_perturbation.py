"""Perturbations as data (SPEC §6.2): each mask has its documented effect, equals the same
edit made to a copy of the weights, K conditions batched in one pass equal K separate passes,
and the stored parameters are never touched. Runs once per engine in mpn_engine.ENGINES.
Axis order: (B, T, N).
"""
import copy

import numpy as np
import pytest
import torch

import mpn
import mpn_engine
from net_helpers import Perturbation

ENGINES = list(mpn_engine.ENGINES)
DT = torch.float64
TOL = dict(atol=1e-10, rtol=1e-10)
N_IN, N, B, T = 5, 8, 3, 7


def make_net(engine="reference", kind="dmpn", **opts):
    kw = dict(n_input=N_IN, n_hidden=N, seed=0)
    if kind == "dmpn":
        kw.update(engine=engine, **opts)
    net = mpn.build_model(kind, **kw).to(DT)
    if kind == "dmpn":
        with torch.no_grad():
            net.mp.eta.fill_(1.5)  # strong plasticity, so M matters
    return net


def inputs(seed=0, n=B):
    return torch.randn(n, T, N_IN, generator=torch.Generator().manual_seed(seed), dtype=DT)


def snapshot(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def assert_untouched(net, before):
    after = net.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def rand_mask(shape, seed, p_zero=0.3):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=DT) > p_zero).to(DT)


@pytest.mark.parametrize("engine", ENGINES)
def test_silenced_hidden_unit(engine):
    net = make_net(engine, recurrent=True)
    before = snapshot(net)
    mask = torch.ones(N, dtype=DT)
    mask[[2, 5]] = 0
    out = net(inputs(), perturbation=Perturbation(hid_mask=mask), record=("M",))
    assert torch.all(out["h"][:, :, [2, 5]] == 0)
    assert torch.all(out["M"][:, :, [2, 5], :] == 0) and torch.all(out["M_final"][:, [2, 5]] == 0)
    assert out["M_final"][:, [0, 1]].abs().min() > 0
    keep = [i for i in range(N) if i not in (2, 5)]  # the readout sees nothing from them
    torch.testing.assert_close(out["y"], out["h"][..., keep] @ net.W_out[:, keep].T, **TOL)
    assert_untouched(net, before)


@pytest.mark.parametrize("engine", ENGINES)
def test_silenced_input_unit_equals_zeroed_embedding_row(engine):
    net = make_net(engine)
    mask = torch.ones(N, dtype=DT)
    mask[[1, 6]] = 0
    out = net(inputs(), perturbation=Perturbation(in_mask=mask), record=("x",))
    assert torch.all(out["x"][:, :, [1, 6]] == 0) and torch.all(out["M_final"][:, :, [1, 6]] == 0)
    edited = copy.deepcopy(net)
    with torch.no_grad():
        edited.W_in[[1, 6]] = 0  # tanh(0) = 0
    torch.testing.assert_close(out["y"], edited(inputs())["y"], **TOL)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mp_type", ["mult", "add"])
def test_zero_w_and_noise_equal_edited_weights(engine, mp_type):
    net = make_net(engine, mp_type=mp_type)
    before = snapshot(net)
    w_mask = rand_mask((N, N), 1)
    noise = 0.05 * torch.randn(N, N, generator=torch.Generator().manual_seed(2), dtype=DT)
    out = net(inputs(), perturbation=Perturbation(w_mask=w_mask, w_noise=noise))
    edited = copy.deepcopy(net)
    with torch.no_grad():
        edited.mp.W.copy_(net.mp.W * w_mask + noise)
    torch.testing.assert_close(out["y"], edited(inputs())["y"], **TOL)
    torch.testing.assert_close(out["M_final"], edited(inputs())["M_final"], **TOL)
    assert_untouched(net, before)


@pytest.mark.parametrize("engine", ENGINES)
def test_zero_w_mult_removes_synapse_whatever_m(engine):
    """With mp_type mult, W_eff = W(1 + M): a zeroed synapse carries nothing even when M ≠ 0.
    Checked by silencing every synapse onto unit 0 except from presynaptic unit 3."""
    net = make_net(engine, recurrent=False)
    w_mask = torch.ones(N, N, dtype=DT)
    w_mask[0] = 0
    w_mask[0, 3] = 1
    out = net(inputs(), perturbation=Perturbation(w_mask=w_mask), record=("x", "M"))
    W03, b0 = net.mp.W[0, 3], net.mp.b[0]
    expect = torch.tanh(W03 * (1 + out["M"][:, :, 0, 3]) * out["x"][:, :, 3] + b0)
    torch.testing.assert_close(out["h"][:, :, 0], expect, **TOL)
    assert out["M"][:, 1:, 0, 0].abs().max() > 0  # M still learns at the zeroed synapses


@pytest.mark.parametrize("engine", ENGINES)
def test_freeze_m(engine):
    net = make_net(engine)
    freeze = 1 - rand_mask((N, N), 3, p_zero=0.5)
    out = net(inputs(), perturbation=Perturbation(m_freeze=freeze), record=("M",))
    frozen = freeze.bool()
    assert torch.all(out["M"][:, :, frozen] == 0) and torch.all(out["M_final"][:, frozen] == 0)
    assert out["M_final"][:, ~frozen].abs().max() > 0.1
    full = net(inputs(), perturbation=Perturbation(m_freeze=torch.ones(N, N, dtype=DT)))
    still = net(inputs(), perturbation=Perturbation(m_freeze=torch.ones(N, N, dtype=DT),
                                                    w_mask=torch.ones(N, N, dtype=DT)))
    torch.testing.assert_close(full["y"], still["y"], **TOL)
    static = torch.tanh(torch.tanh(inputs() @ net.W_in.T) @ net.mp.W.T + net.mp.b)
    torch.testing.assert_close(full["h"], static, **TOL)  # all frozen: a feedforward net


def _conditions():
    hid = torch.ones(N, dtype=DT)
    hid[4] = 0
    inp = torch.ones(N, dtype=DT)
    inp[[0, 7]] = 0
    return [
        None,
        Perturbation(hid_mask=hid),
        Perturbation(in_mask=inp, w_mask=rand_mask((N, N), 5)),
        Perturbation(m_freeze=1 - rand_mask((N, N), 6)),
        Perturbation(w_noise=0.1 * torch.randn(N, N, generator=torch.Generator().manual_seed(7),
                                               dtype=DT)),
    ]


@pytest.mark.parametrize("engine", ENGINES)
def test_k_conditions_in_one_pass_equal_k_passes(engine):
    net = make_net(engine, recurrent=True)
    before = snapshot(net)
    conds = _conditions()
    u = inputs(n=B)
    stacked = Perturbation.stack(conds, B)
    assert stacked.hid_mask.shape == (len(conds) * B, N)
    out = net(u.repeat(len(conds), 1, 1), perturbation=stacked)
    for k, cond in enumerate(conds):
        alone = net(u, perturbation=cond)
        sl = slice(k * B, (k + 1) * B)
        torch.testing.assert_close(out["y"][sl], alone["y"], **TOL)
        torch.testing.assert_close(out["h"][sl], alone["h"], **TOL)
        torch.testing.assert_close(out["M_final"][sl], alone["M_final"], **TOL)
    assert_untouched(net, before)


@pytest.mark.parametrize("kind", ["vanilla", "gru"])
def test_baseline_perturbations(kind):
    net = make_net(kind=kind)
    before = snapshot(net)
    hid = torch.ones(N, dtype=DT)
    hid[3] = 0
    conds = [None, Perturbation(hid_mask=hid), Perturbation(w_mask=rand_mask((N, N), 8)),
             Perturbation(w_noise=0.1 * torch.randn(N, N, dtype=DT,
                                                    generator=torch.Generator().manual_seed(9)))]
    u = inputs()
    out = net(u.repeat(len(conds), 1, 1), perturbation=Perturbation.stack(conds, B))
    for k, cond in enumerate(conds):
        torch.testing.assert_close(out["y"][k * B:(k + 1) * B],
                                   net(u, perturbation=cond)["y"], **TOL)
    assert torch.all(out["h"][B:2 * B, :, 3] == 0)
    edited = copy.deepcopy(net)
    with torch.no_grad():  # the (N, N) mask acts on every gate block of the GRU
        reps = 3 if kind == "gru" else 1
        edited.W_rec.mul_(conds[2].w_mask.repeat(reps, 1))
    torch.testing.assert_close(out["y"][2 * B:3 * B], edited(u)["y"], **TOL)
    with pytest.raises(ValueError, match="cannot apply the in_mask"):
        net(u, perturbation=Perturbation(in_mask=torch.ones(N_IN, dtype=DT)))
    assert_untouched(net, before)


def test_shape_errors_and_chunk_slicing():
    net = make_net()
    with pytest.raises(ValueError, match="per-trial hid_mask has 2 trials"):
        net(inputs(), perturbation=Perturbation(hid_mask=torch.ones(2, N, dtype=DT)))
    with pytest.raises(ValueError, match="shared"):
        Perturbation.stack([Perturbation(hid_mask=torch.ones(2, N))], 3)
    p = Perturbation.stack([None, Perturbation(hid_mask=np.zeros(N))], 2)
    part = p.trials(1, 3)
    assert part.hid_mask.tolist() == [[1.0] * N, [0.0] * N]
    shared = Perturbation(w_mask=torch.ones(N, N)).trials(0, 1)
    assert shared.w_mask.shape == (N, N)
