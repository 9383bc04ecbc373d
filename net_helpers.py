"""What every model shares: the base class, seeded initialisation, perturbations as data,
the loss, the one `evaluate`, and checkpoints (SPEC §1, §1.3, §4, §6.2).

Axis order: trials x time x units, (B, T, N). Weight matrices are (N_post, N_pre).

A perturbation (SPEC §6.2) is data handed to `forward`, never an edit of stored parameters:
unit masks on the presynaptic activity x and on the hidden units h, a synapse mask on W, a
freeze mask on M and an additive noise on W. Each field is either shared by all trials (no
leading axis) or per trial (leading axis B), so K conditions x n trial copies run in one pass.
"""
import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import nn

import run_folder
import mpn_tasks



# ----------------------------------------------------------------------------------------
# Initialisation


def xavier_uniform(shape, gen, dtype=torch.float32):
    """U(-a, a), a = √(6 / (fan_in + fan_out)), for a (fan_out, fan_in) matrix."""
    fan_out, fan_in = shape
    a = math.sqrt(6.0 / (fan_in + fan_out))
    return (torch.rand(shape, generator=gen, dtype=dtype) * 2.0 - 1.0) * a


def bias_normal(n, gen, dtype=torch.float32):
    """b ~ N(0, 1) / √n (SPEC §1.1)."""
    return torch.randn(n, generator=gen, dtype=dtype) / math.sqrt(n)


def make_generator(seed):
    """The torch.Generator every model draws its initial weights from."""
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return gen


# ----------------------------------------------------------------------------------------
# Perturbations


@dataclass
class Perturbation:
    """Optional masks and noise applied inside the forward pass.

    in_mask (N_pre,) | (B, N_pre): 0 silences presynaptic (embedding output) unit j: x_j ≡ 0.
    hid_mask (N,) | (B, N): 0 silences hidden unit i: h_i ≡ 0 (its row of M stays 0 and it
        sends nothing to the readout).
    w_mask (N, N_pre) | (B, N, N_pre): multiplies W, so 0 gives W = 0 there ("zero_W").
    m_freeze (N, N_pre) | (B, N, N_pre): 1 holds M at 0 there ("freeze_M"); W intact.
    w_noise (N, N_pre) | (B, N, N_pre): added to W (after w_mask).
    For vanilla and GRU, w_mask / w_noise act on the recurrent weights (N, N); see mpn.py.
    """
    in_mask: object = None
    hid_mask: object = None
    w_mask: object = None
    m_freeze: object = None
    w_noise: object = None

    # Number of axes of each field when shared by all trials.
    BASE_NDIM = {"in_mask": 1, "hid_mask": 1, "w_mask": 2, "m_freeze": 2, "w_noise": 2}
    # Value of a field for a trial copy whose condition leaves it out.
    NEUTRAL = {"in_mask": 1.0, "hid_mask": 1.0, "w_mask": 1.0, "m_freeze": 0.0, "w_noise": 0.0}

    def items(self):
        """(name, tensor) for every field that is set."""
        return [(f.name, getattr(self, f.name)) for f in fields(self)
                if getattr(self, f.name) is not None]

    def is_per_trial(self, name):
        return torch.as_tensor(getattr(self, name)).ndim == self.BASE_NDIM[name] + 1

    def to(self, device, dtype):
        """A copy with every set field as a tensor of this device and dtype."""
        return Perturbation(**{k: torch.as_tensor(v).to(device=device, dtype=dtype)
                               for k, v in self.items()})

    def trials(self, start, stop):
        """The perturbation seen by trials [start, stop) (per-trial fields are sliced)."""
        return Perturbation(**{k: (v[start:stop] if self.is_per_trial(k) else v)
                               for k, v in self.items()})

    def check(self, n_trials, allowed):
        """Raise a clear ValueError for a field the model cannot apply or a wrong trial count."""
        for name, value in self.items():
            if name not in allowed:
                raise ValueError(f"this model cannot apply the {name} perturbation "
                                 f"(it supports {sorted(allowed)}).")
            ndim = torch.as_tensor(value).ndim
            if ndim not in (self.BASE_NDIM[name], self.BASE_NDIM[name] + 1):
                raise ValueError(f"{name} has {ndim} axes; expected {self.BASE_NDIM[name]} "
                                 f"(shared) or {self.BASE_NDIM[name] + 1} (per trial).")
            if ndim == self.BASE_NDIM[name] + 1 and value.shape[0] != n_trials:
                raise ValueError(f"per-trial {name} has {value.shape[0]} trials but the "
                                 f"batch has {n_trials}.")

    @classmethod
    def stack(cls, conditions, n_per):
        """Per-trial perturbation for K conditions x n_per trial copies: trial k*n_per + i
        gets condition k. A condition may be None (intact network); fields a condition leaves
        out take their neutral value. Pair it with the test batch repeated K times."""
        conditions = [c if c is not None else cls() for c in conditions]
        out = {}
        for name in cls.BASE_NDIM:
            given = [torch.as_tensor(getattr(c, name)) for c in conditions
                     if getattr(c, name) is not None]
            if not given:
                continue
            ref = given[0]
            rows = []
            for c in conditions:
                v = getattr(c, name)
                v = (torch.full_like(ref, cls.NEUTRAL[name]) if v is None
                     else torch.as_tensor(v).to(ref.dtype))
                if v.ndim != cls.BASE_NDIM[name] or v.shape != ref.shape:
                    raise ValueError(f"Perturbation.stack needs shared {name} fields of one "
                                     f"shape; got {tuple(v.shape)} and {tuple(ref.shape)}.")
                rows.append(v.unsqueeze(0).expand(n_per, *v.shape))
            out[name] = torch.cat(rows, dim=0)
        return cls(**out)


def per_trial(value, base_ndim, n_trials):
    """A shared (base_ndim axes) or per-trial field as a per-trial tensor, without a copy."""
    if value is None or value.ndim == base_ndim + 1:
        return value
    return value.expand(n_trials, *value.shape)


# ----------------------------------------------------------------------------------------
# Base class


class BaseNetwork(nn.Module):
    """A network that runs a batch of trials over time.

    Subclasses set `net_type`, keep their JSON-able constructor arguments in
    `self.init_args`, and implement `forward(inputs, perturbation=None, record=(),
    m_reduce=None) -> dict` with "y" (B, T, n_out) and "h" (B, T, N), plus "x" if "x" in
    record and, for MPNs, "M" (B, T, N, N_pre: M_{t-1}, the matrix used at step t) if "M" in
    record. `m_reduce(t, M_prev)` streams M_{t-1} to the caller without storing it.
    """
    net_type = None
    perturbable = ()  # Perturbation fields this model can apply
    plastic = False  # has a fast-weight matrix M (and a presynaptic layer x feeding it)

    def synapse_shape(self):
        """(N_post, N_pre) of the weight matrix that the w_mask, m_freeze and w_noise
        perturbations act on (the plastic layer's W; W_rec of a recurrent baseline)."""
        return tuple(self.synapse_weight().shape)

    def synapse_weight(self):
        """That weight matrix (a live parameter view: detach before editing)."""
        raise NotImplementedError

    def set_engine(self, engine):
        """Run the plastic layer on this mpn_engine engine; a no-op for non-plastic models."""

    def rows_independent(self):
        """Whether each hidden unit runs independently of the others given the network's
        presynaptic input x, so that a subset of rows can be rerun alone (forward_rows)."""
        return False

    def weight_params(self):
        """The tensors the L2 weight penalty applies to."""
        raise NotImplementedError

    def clamp_parameters(self):
        """Project parameters back into their allowed range; call after every optimiser step."""

    def n_trainable(self):
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _perturbation(self, perturbation, inputs):
        """The perturbation as tensors of the inputs' device and dtype, checked; or None."""
        if perturbation is None or not perturbation.items():
            return None
        p = perturbation.to(inputs.device, inputs.dtype)
        p.check(inputs.shape[0], self.perturbable)
        return p


# ----------------------------------------------------------------------------------------
# Batches, loss, evaluation


def batch_to_torch(batch, device="cpu", dtype=torch.float32):
    """The tensors of an mpn_tasks.Batch that the loss needs: inputs, targets, mask
    (B, T, n_out) float; rule, length (B,) int64; valid (B, T) float, 1 on real (unpadded) steps."""
    B, T = batch.inputs.shape[:2]
    length = torch.as_tensor(np.asarray(batch.length), dtype=torch.int64, device=device)
    valid = (torch.arange(T, device=device)[None, :] < length[:, None]).to(dtype)
    return {
        "inputs": torch.as_tensor(batch.inputs, device=device, dtype=dtype),
        "targets": torch.as_tensor(batch.targets, device=device, dtype=dtype),
        "mask": torch.as_tensor(batch.mask, device=device, dtype=dtype),
        "rule": torch.as_tensor(np.asarray(batch.rule), dtype=torch.int64, device=device),
        "length": length,
        "valid": valid,
    }


def _loss_sums(out, batch_t):
    """Sums behind the two data terms, so chunked evaluation can combine them exactly:
    (Σ mask·(y−target)², number of output elements, Σ h² over real steps, count of those)."""
    sq = (batch_t["mask"] * (out["y"] - batch_t["targets"]) ** 2).sum()
    h = out["h"]
    valid = batch_t.get("valid")
    if valid is None:
        valid = h.new_ones(h.shape[:2])
    h2 = ((h ** 2).sum(-1) * valid).sum()
    return sq, out["y"].numel(), h2, valid.sum() * h.shape[-1]


def weight_penalty(net):
    return sum((w ** 2).sum() for w in net.weight_params())


def _combine(sq, n_out_el, h2, n_h, wsum, weight_reg, activity_reg):
    mse = sq / n_out_el
    w_term = 0.5 * weight_reg * wsum
    a_term = activity_reg * h2 / n_h
    return mse + w_term + a_term, {"mse": mse, "weight": w_term, "activity": a_term}


def compute_loss(out, batch_t, net, weight_reg=1e-4, activity_reg=1e-4):
    """SPEC §4: masked MSE averaged over all B·T·n_out elements + weight_reg/2 · Σ‖W‖² over
    `net.weight_params()` + activity_reg · mean(h²) over real (unpadded) steps.
    Returns (total, parts) with parts = {"mse", "weight", "activity"} (tensors)."""
    sq, n_el, h2, n_h = _loss_sums(out, batch_t)
    return _combine(sq, n_el, h2, n_h, weight_penalty(net), weight_reg, activity_reg)


def _slice_batch_t(batch_t, start, stop):
    return {k: v[start:stop] for k, v in batch_t.items()}


@torch.no_grad()
def evaluate(net, batch, *, weight_reg=1e-4, activity_reg=1e-4, perturbation=None,
             chunk_size=None):
    """Loss and both accuracy measures, per rule, of `net` on an mpn_tasks.Batch.

    Runs in chunks of `chunk_size` trials (all at once if None); per-trial perturbation
    fields are sliced with the trials. Returns dict(loss, loss_mse (floats),
    acc={"angle": {rule: acc}, "trial": {rule: acc}}, acc_se (the same, standard errors over
    the trials: mpn_tasks.ratio_se), mean_angle, mean_trial (means over the rules present),
    mean_angle_se, mean_trial_se, outputs (B, T, n_out) numpy).
    """
    p0 = next(net.parameters())
    batch_t = batch_to_torch(batch, p0.device, p0.dtype)
    B = batch_t["inputs"].shape[0]
    chunk = B if chunk_size is None else int(chunk_size)
    sq = h2 = 0.0
    n_h = 0.0
    ys = []
    for start in range(0, B, chunk):
        stop = min(start + chunk, B)
        part = _slice_batch_t(batch_t, start, stop)
        pert = None if perturbation is None else perturbation.trials(start, stop)
        out = net(part["inputs"], perturbation=pert)
        s, _, h, n = _loss_sums(out, part)
        sq, h2, n_h = sq + s, h2 + h, n_h + n
        ys.append(out["y"])
    y = torch.cat(ys, dim=0)
    loss, parts = _combine(sq, y.numel(), h2, n_h, weight_penalty(net), weight_reg,
                           activity_reg)
    outputs = y.float().cpu().numpy()
    acc, se = mpn_tasks.accuracy_and_se_by_rule(outputs, batch)
    return {
        "loss": float(loss),
        "loss_mse": float(parts["mse"]),
        "acc": acc,
        "acc_se": se,
        **mpn_tasks.rule_means(acc, se),
        "outputs": outputs,
    }


# ----------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path, net, cfg, step, extra=None):
    """Write one torch.save dict (atomically) that torch.load(weights_only=True) can read:
    net_type, init_args, state_dict, config, step and `extra` (optimiser, scheduler, sampler
    and RNG states; tensors, numbers, strings, lists and dicts only)."""
    ckpt = {
        "net_type": net.net_type,
        "init_args": dict(net.init_args),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "config": dict(cfg) if cfg is not None else {},
        "step": int(step),
        "extra": extra if extra is not None else {},
    }
    run_folder.save_torch(path, ckpt, cfg=cfg)


def load_checkpoint(path, producer=None):
    """Read a checkpoint (or a snapshot); a missing, truncated or foreign file is a
    StageError naming the training command."""
    producer = producer or run_folder.PRODUCERS["checkpoint.pt"]
    ckpt = run_folder.load_torch(path, producer)
    needed = ("net_type", "init_args", "state_dict", "config", "step")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in needed):
        raise run_folder.StageError(f"{str(path)!r} is not a model checkpoint (it lacks "
                                f"{', '.join(needed)}); run `{producer}` to make one.")
    return ckpt


def rng_state(gen):
    """A numpy Generator's or torch Generator's state in a weights_only-loadable form."""
    if isinstance(gen, torch.Generator):
        return gen.get_state()
    state = gen.bit_generator.state
    return {"bit_generator": state["bit_generator"],
            "state": {k: str(v) for k, v in state["state"].items()},
            "has_uint32": int(state.get("has_uint32", 0)), "uinteger": int(state.get("uinteger", 0))}


def set_rng_state(gen, state):
    """Inverse of `rng_state`."""
    if isinstance(gen, torch.Generator):
        gen.set_state(state)
        return
    gen.bit_generator.state = {"bit_generator": state["bit_generator"],
                               "state": {k: int(v) for k, v in state["state"].items()},
                               "has_uint32": state["has_uint32"], "uinteger": state["uinteger"]}
