"""Train one network on a set of cognitive tasks with adaptive rule sampling (SPEC §4).

Reads: nothing, or runs/<aname>/checkpoint.pt when resuming.
Writes runs/<aname>/ (aname = helper.run_name(cfg), e.g. everything_dmpn_seed749_L21e4_h300_b128):
    config.json                  the resolved configuration
    checkpoint.pt                model + optimiser, scheduler, sampler and RNG states (atomic)
    log.json                     one entry per evaluation: step, wall and process CPU time,
                                 lr, losses, both accuracies per rule, sampling weights p
    snapshots/weights_step*.pt   weights at steps 0, 1, 32, 1024, 32768 and the end
    figures/training_*.png       curves, accuracy heatmap, each rule's share of the trials, examples
    manifest.json, .lock         sha256 and producer of each file; the writer lock (helper.run_lock)

Example:
    python multiple_task.py configs/cpu_quick.py          # all 15 rules on a CPU
    python multiple_task.py configs/paper.py              # the published setting (GPU)
    python multiple_task.py configs/cpu_quick.py --max_steps=30000   # continue a finished run

An existing run folder is continued from its checkpoint when its config.json matches the
resolved config (only the keys in RESUMABLE_KEYS may change); a different config is refused.

Axis order: trials x time x channels, (B, T, C).
"""
import functools
import itertools
import json
import math
import os
import time

import numpy as np
import torch

import batch_feed
import helper
import mpn
import mpn_cpp
import mpn_tasks
import net_helpers

CONFIG = dict(
    # tasks (SPEC §2)
    ruleset="everything",  # mpn_tasks.RULESETS: everything (15 rules), go (6) {@ruleset}
    io_mode="low_dim",  # input/output layout: "low_dim" (21 in, 3 out) or "ring" {low_dim | ring}
    sigma_x=0.0,  # std of the input noise during training and validation (SPEC §2.3) {>= 0}
    # model (SPEC §1; handed to mpn.build_model)
    net="dmpn",  # multi-plastic network, leaky RNN or GRU {dmpn | vanilla | gru}
    n_hidden=300,  # hidden units N {>= 1}
    mp_type="mult",  # dmpn: "mult" (W + W*M) or "add" (W + M) {mult | add}
    m_update="hebb_assoc",  # dmpn: eta post x pre, or post = 1/sqrt(N) {hebb_assoc | hebb_pre}
    eta_type="scalar",  # dmpn: shape of eta {scalar | pre_vector | post_vector | matrix}
    lam_type="scalar",  # dmpn: shape of lambda {scalar | pre_vector | post_vector | matrix}
    eta_train=True,  # dmpn: learn eta {@bool}
    lam_train=False,  # dmpn: learn lambda (clamped to [0, 1 - dt/tau_M_ms]) {@bool}
    eta_init=1.0,  # dmpn: initial eta {> -1e6, < 1e6}
    tau_M_ms=4000.0,  # dmpn: time constant of M in ms; lambda = 1 - dt/tau_M_ms {> 0}
    m_bounds=[-1.0, 1.0],  # dmpn: clip range of M (None: no clip) {None | @increasing_pair}
    recurrent=False,  # dmpn: add a recurrent weight W_rec h_{t-1} {@bool}
    input_layer=True,  # dmpn: embedding x = tanh(W_in u); False: u to the plastic layer {@bool}
    tau_ms=200.0,  # vanilla: unit time constant in ms (alpha = dt/tau_ms) {> 0}
    # optimisation (SPEC §4)
    batch_size=128,  # trials per step {>= 1}
    rules_per_batch=1,  # rules per step, batch_size / this trials each (SPEC §4: 1) {>= 1}
    lr=1e-3,  # Adam learning rate {> 0, <= 1}
    weight_reg=1e-4,  # L2 penalty weight_reg/2 * sum ||W||^2 over W_in, W, W_out (W_rec) {>= 0}
    activity_reg=1e-4,  # activity penalty activity_reg * mean(h^2) over real steps {>= 0}
    grad_clip=10.0,  # maximum gradient norm {> 0}
    lr_schedule="plateau",  # plateau (SPEC §4; the next 3 keys) or half cosine {plateau | cosine}
    lr_decay_steps=100000,  # cosine: lr falls to lr_min over this many steps, then stays {>= 1}
    lr_factor=0.95,  # ReduceLROnPlateau on validation loss: multiply lr by this ... {> 0, < 1}
    lr_patience=30,  # ... after this many evaluations without improvement ... {>= 0}
    lr_min=1e-8,  # ... down to this lr {>= 0}
    max_steps=100000,  # optimiser steps (the paper: 100,000) {>= 0}
    max_minutes=None,  # stop after this many training minutes, summed over resumes {None | > 0}
    # rule sampling and validation
    sampling="adaptive",  # SPEC §4: weak rules drawn more often, or not {adaptive | uniform}
    p_min_frac=0.2,  # floor of a rule's sampling probability, in units of 1/n_rules {>= 0, <= 1}
    eval_every=100,  # steps between evaluations on the fixed validation set {>= 1}
    n_valid=128,  # validation trials per rule (random_batch, drawn once from the seed) {>= 1}
    acc_measure="trial",  # accuracy driving sampling and stopping (trial: strict) {trial | angle}
    target_acc=None,  # stop when every rule's accuracy >= this ... {None | >= 0, <= 1}
    patience_evals=3,  # ... at this many consecutive evaluations {>= 1}
    # bookkeeping
    ckpt_every=1000,  # steps between checkpoints (plus one at the end) {>= 1}
    snapshot_steps=[0, 1, 32, 1024, 32768],  # steps whose weights are kept (+ last) {each >= 0}
    seed=749,  # seeds the weights, the validation set and the training stream {>= 0, < 4294967296}
    device="auto",  # "auto" (cuda if available), "cpu" or "cuda" {@device}
    engine="auto",  # plastic-layer engine of mpn_engine {@engine}
    num_threads=0,  # torch CPU threads (0: torch's default) {>= 0}
    prefetch=True,  # draw each next training batch in a forked child process during the step (Linux, CPU; the same batches: results do not depend on it) {@bool}
    kernel_threads=0,  # compiled-kernel threads; 0: 2 while a second core is free, else 1, re-chosen every evaluation (mpn_cpp.AdaptiveThreads; $MPN_KERNEL_THREADS fixes it); results do not depend on it {>= 0}
    runs_dir=None,  # root of the run folders (None: $MPN_RUNS_DIR or runs/) {None | @path}
    figures=True,  # draw the training figures into figures/ at the end {@bool}
    run_tag="",  # suffix of the run name, to keep variants apart {@run_name}
    resume=None,  # None: continue a matching run; True: must continue; False: new {None | @bool}
)

# Keys that may change when a run is continued. None changes what a step computes, except
# that device, engine and num_threads change its float rounding: a run resumed on another
# engine equals an uninterrupted one up to float rounding, not bit for bit (tests/
# test_training.py checks both).
RESUMABLE_KEYS = ("max_steps", "max_minutes", "target_acc", "patience_evals", "ckpt_every",
                  "device", "engine", "num_threads", "kernel_threads", "prefetch", "runs_dir",
                  "resume", "figures")
CONFIG_ID_KEYS = ("ruleset", "net", "n_hidden", "batch_size", "seed")  # in every config.json


# ----------------------------------------------------------------------------------------
# Adaptive rule sampling


class AdaptiveSampler:
    """Rule probabilities of SPEC §4. After each evaluation, with accuracies acc_r:
        g_r = (1 - acc_r) / sum_r' (1 - acc_r');  S <- 0.9 (S + g);  p = S / sum(S),
    then p floored at p_min and renormalised. Initially S = 0 and p is uniform.
    When every rule is perfect (sum(1 - acc) = 0) no rule needs more practice than another,
    so g is taken uniform: p relaxes towards uniform instead of dividing by zero."""

    def __init__(self, n_rules, p_min, decay=0.9, adaptive=True):
        self.n, self.p_min, self.decay, self.adaptive = n_rules, p_min, decay, adaptive
        self.S = np.zeros(n_rules)
        self.p = np.full(n_rules, 1.0 / n_rules)

    def update(self, acc):
        if not self.adaptive:
            return self.p
        err = 1.0 - np.clip(np.asarray(acc, dtype=float), 0.0, 1.0)
        g = err / err.sum() if err.sum() > 0 else np.full(self.n, 1.0 / self.n)
        self.S = self.decay * (self.S + g)
        p = np.maximum(self.S / self.S.sum(), self.p_min)
        self.p = p / p.sum()
        return self.p

    def state_dict(self):
        return {"S": self.S.tolist(), "p": self.p.tolist()}

    def load_state_dict(self, state):
        self.S, self.p = np.array(state["S"]), np.array(state["p"])


def inclusion_probabilities(p, k):
    """P(rule r is among a step's k rules) for sampling weights p (..., n): the k rules are
    drawn without replacement as numpy's Generator.choice(n, k, replace=False, p=p) draws
    them, i.e. the first k distinct values of a stream of independent draws from p (each
    draw from p renormalised over the rules not yet drawn). Exact: with P(S) the probability
    that the first |S| draws are the set S, P(S) = sum over r in S of
    P(S - r) p_r / (1 - p(S - r)), and the result sums P(S) over the sets of size k that
    hold r. k = 1 gives p; the result sums to k over the rules (a rule's share of a step's
    trials is this / k, as each of the k rules gets batch_size / k trials). Sets up to size k
    are enumerated: fine for the 15 rules of SPEC §2 (1,941 sets at k = 4)."""
    p = np.asarray(p, dtype=float)
    n = p.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    zero = np.zeros(p.shape[:-1])
    prob = {(): zero + 1.0}  # set (sorted tuple) -> P(the first |S| draws are S)
    for size in range(1, k + 1):
        nxt = {}
        for members in itertools.combinations(range(n), size):
            total = zero
            for i, r in enumerate(members):
                rest = members[:i] + members[i + 1:]
                left = 1.0 - p[..., list(rest)].sum(axis=-1)
                step = np.divide(p[..., r], left, out=np.zeros_like(left), where=left > 0)
                total = total + prob[rest] * step
            nxt[members] = total
        prob = nxt
    out = np.zeros(p.shape)
    for members, value in prob.items():
        out[..., list(members)] += value[..., None]
    return out


# ----------------------------------------------------------------------------------------
# Set-up


def derived(cfg):
    """Values computed from the config (saved in log.json["meta"]); the config's values were
    checked against the CONFIG annotations (helper.check_config) first."""
    rules = list(mpn_tasks.RULESETS[cfg["ruleset"]])
    if cfg["batch_size"] % cfg["rules_per_batch"] or cfg["rules_per_batch"] > len(rules):
        raise helper.StageError(f"rules_per_batch ({cfg['rules_per_batch']}) must divide "
                                f"batch_size ({cfg['batch_size']}) and be at most the number of "
                                f"rules ({len(rules)}).")
    return {"rules": rules, "p_min": cfg["p_min_frac"] / len(rules),
            "n_input": mpn_tasks.n_inputs(cfg["io_mode"]),
            "n_output": mpn_tasks.n_outputs(cfg["io_mode"])}


def model_kwargs(cfg, meta):
    """Constructor arguments of cfg["net"] taken from the config."""
    kw = dict(n_input=meta["n_input"], n_hidden=cfg["n_hidden"], n_output=meta["n_output"],
              seed=cfg["seed"])
    if cfg["net"] == "dmpn":
        for key in ("mp_type", "m_update", "eta_type", "lam_type", "eta_train", "lam_train",
                    "eta_init", "tau_M_ms", "m_bounds", "recurrent", "input_layer", "engine"):
            kw[key] = cfg[key]
    elif cfg["net"] == "vanilla":
        kw["tau_ms"] = cfg["tau_ms"]
    return kw


def build(cfg, meta, device):
    """Network, Adam and ReduceLROnPlateau of SPEC §4."""
    try:
        net = mpn.build_model(cfg["net"], **model_kwargs(cfg, meta)).to(device)
    except ValueError as err:
        raise helper.StageError(f"bad model option: {err}") from err
    opt = torch.optim.Adam(net.parameters(), lr=cfg["lr"])
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=cfg["lr_factor"], patience=cfg["lr_patience"],
        min_lr=cfg["lr_min"])
    return net, opt, sched


def validation_set(cfg, rules):
    """The fixed validation batches, one per rule, drawn from a seed-derived Generator that
    the training stream never touches."""
    rng = np.random.default_rng([cfg["seed"], 1])
    return {rule: mpn_tasks.random_batch(rule, cfg["n_valid"], rng, sigma_x=cfg["sigma_x"],
                                         io_mode=cfg["io_mode"]) for rule in rules}


def normalised(cfg):
    """The config as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(cfg))


def check_run_folder(cfg, paths):
    """Decide between a new run and a resumed one; refuse a changed config. Returns True to
    resume. Nothing in an existing folder is ever deleted."""
    has_ckpt = paths.checkpoint.exists()
    if cfg["resume"] is True and not has_ckpt:
        raise helper.StageError(f"--resume=True but {str(paths.checkpoint)!r} does not exist; "
                                f"drop --resume to start this run.")
    if cfg["resume"] is False and has_ckpt:
        raise helper.StageError(f"{str(paths.dir)!r} already holds a trained run; move it "
                                f"away, pick another --run_tag, or drop --resume=False to "
                                f"continue it.")
    if not has_ckpt:
        return False
    old = helper.load_json(paths.config, keys=CONFIG_ID_KEYS) \
        if paths.config.exists() else net_helpers.load_checkpoint(paths.checkpoint)["config"]
    new, absent = normalised(cfg), "<absent>"
    changed = sorted(k for k in set(old) | set(new)
                     if k not in RESUMABLE_KEYS and old.get(k, absent) != new.get(k, absent))
    if changed:
        diff = ", ".join(f"{k}: {old.get(k, absent)!r} -> {new.get(k, absent)!r}"
                         for k in changed)
        raise helper.StageError(f"{str(paths.dir)!r} was trained with another config ({diff}); "
                                f"use the same values to continue it, or pass --run_tag=<name> "
                                f"(or --runs_dir) to train a separate run.")
    return True


# ----------------------------------------------------------------------------------------
# Training state and checkpoints


class Diverged(Exception):
    """The loss became NaN or inf."""


def new_state():
    return {"step": 0, "good_evals": 0, "stop_reason": None, "elapsed_s": 0.0, "cpu_s": 0.0,
            "train_sums": {}, "train_count": 0, "log": []}


def cosine_lr(cfg, step):
    """lr of the cosine schedule after `step` steps: lr_min + (lr - lr_min)(1 + cos(pi s/D))/2
    with s = min(step, D), D = lr_decay_steps. A function of the step alone, so a resumed or
    extended run follows the same curve."""
    frac = min(step, cfg["lr_decay_steps"]) / cfg["lr_decay_steps"]
    return cfg["lr_min"] + (cfg["lr"] - cfg["lr_min"]) * 0.5 * (1.0 + math.cos(math.pi * frac))


def save_checkpoint(paths, net, cfg, state, opt, sched, sampler, rng):
    if not all(torch.isfinite(p).all() for p in net.parameters()):
        raise Diverged("a parameter is not finite")
    extra = {
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "sampler": sampler.state_dict(), "rng": net_helpers.rng_state(rng),
        "torch_rng": torch.get_rng_state(),
        "state": {k: v for k, v in state.items() if k not in ("step", "log")},
    }
    net_helpers.save_checkpoint(paths.checkpoint, net, normalised(cfg), state["step"], extra)


def restore(paths, net, opt, sched, sampler, rng, state):
    """Load every state a step depends on; the log is cut back to the checkpoint's step."""
    ckpt = net_helpers.load_checkpoint(paths.checkpoint)
    net.load_state_dict(ckpt["state_dict"])
    extra = ckpt["extra"]
    opt.load_state_dict(extra["optimizer"])
    sched.load_state_dict(extra["scheduler"])
    sampler.load_state_dict(extra["sampler"])
    net_helpers.set_rng_state(rng, extra["rng"])
    torch.set_rng_state(extra["torch_rng"])
    state.update(extra["state"])
    state["step"] = ckpt["step"]
    log = helper.load_json(paths.log, keys=("meta", "evals"))["evals"] \
        if paths.log.exists() else []
    if not isinstance(log, list) or not all(isinstance(e, dict) and "step" in e for e in log):
        raise helper.StageError(f"{str(paths.log)!r} is not a training log (its evals are not "
                                f"entries with a step); restore it, or move it away to resume "
                                f"without the earlier curves.")
    state["log"] = [e for e in log if e["step"] <= state["step"]]
    print(f"resuming {paths.name} from step {state['step']}")


def save_snapshot(paths, net, cfg, step):
    """Weights only (plus constructor arguments: net_helpers.model_from_checkpoint reads it)."""
    net_helpers.save_checkpoint(paths.snapshot(step), net, normalised(cfg), step)


# ----------------------------------------------------------------------------------------
# One step, one evaluation


def training_batch(cfg, rules, p, rng):
    """One step's trials: batch_size trials of one rule drawn from p (SPEC §4); with
    rules_per_batch = r > 1, r different rules drawn from p, batch_size / r trials each,
    zero-padded to the longest (padding is masked out of the loss)."""
    r = cfg["rules_per_batch"]
    kw = dict(sigma_x=cfg["sigma_x"], io_mode=cfg["io_mode"])
    if r == 1:
        return mpn_tasks.random_batch(rules[rng.choice(len(rules), p=p)], cfg["batch_size"],
                                      rng, **kw)
    picks = rng.choice(len(rules), size=r, replace=False, p=p)
    return mpn_tasks.mixed_batch([rules[i] for i in picks], cfg["batch_size"] // r, rng, **kw)


def train_step(net, opt, batch, cfg, device):
    """Forward, loss, backward, clip, Adam, clamp. Raises Diverged before touching the
    weights when the loss or the gradient is not finite."""
    net.train()
    batch_t = net_helpers.batch_to_torch(batch, device)
    out = net(batch_t["inputs"])
    loss, parts = net_helpers.compute_loss(out, batch_t, net, cfg["weight_reg"],
                                           cfg["activity_reg"])
    if not torch.isfinite(loss):
        raise Diverged(f"training loss is {loss.item()}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg["grad_clip"])
    if not torch.isfinite(grad_norm):
        raise Diverged(f"gradient norm is {float(grad_norm)}")
    opt.step()
    net.clamp_parameters()
    return {"loss": loss.item(), **{k: float(v.detach()) for k, v in parts.items()}}


def evaluate_rules(net, valid, cfg):
    """net_helpers.evaluate on each rule's validation batch (rules differ in length, so one
    batch per rule avoids padding). Loss is the mean over rules."""
    net.eval()
    per_rule = {rule: net_helpers.evaluate(net, batch, weight_reg=cfg["weight_reg"],
                                           activity_reg=cfg["activity_reg"])
                for rule, batch in valid.items()}
    acc, se = ({m: {rule: r[key][m][rule] for rule, r in per_rule.items()}
                for m in ("angle", "trial")} for key in ("acc", "acc_se"))
    res = {"loss": float(np.mean([r["loss"] for r in per_rule.values()])),
           "loss_mse": float(np.mean([r["loss_mse"] for r in per_rule.values()])),
           "loss_by_rule": {rule: r["loss"] for rule, r in per_rule.items()}, "acc": acc,
           "acc_se": se, **mpn_tasks.rule_means(acc, se)}
    if not math.isfinite(res["loss"]):
        raise Diverged(f"validation loss is {res['loss']}")
    return res


def on_evaluation(state, res, cfg, meta, opt, sched, sampler, scheduled):
    """Log an evaluation; a scheduled one (every eval_every steps) also drives the sampler,
    the lr schedule and the stopping rule. An off-cadence final one is only logged, so that
    extending max_steps later continues exactly as an uninterrupted run would."""
    rules = meta["rules"]
    if scheduled:
        sampler.update([res["acc"][cfg["acc_measure"]][r] for r in rules])
        if cfg["lr_schedule"] == "plateau":
            sched.step(res["loss"])
        if cfg["target_acc"] is not None:
            good = min(res["acc"][cfg["acc_measure"]].values()) >= cfg["target_acc"]
            state["good_evals"] = state["good_evals"] + 1 if good else 0
    train = {k: v / state["train_count"] for k, v in state["train_sums"].items()} \
        if state["train_count"] else {}
    state["train_sums"], state["train_count"] = {}, 0
    entry = {"step": state["step"], "wall_s": round(state["elapsed_s"], 3),
             "cpu_s": round(state["cpu_s"], 3), **state.pop("kernel", {}),
             "lr": opt.param_groups[0]["lr"], "train": train, **res,
             "p": dict(zip(rules, sampler.p.tolist())), "scheduled": scheduled}
    state["log"].append(entry)
    return entry


def log_line(entry, cfg):
    worst = min(entry["acc"][cfg["acc_measure"]].items(), key=lambda kv: kv[1])
    return (f"step {entry['step']:7d} | {entry['wall_s']:7.0f} s | lr {entry['lr']:.2e} | "
            f"val loss {entry['loss']:.4f} | acc angle {entry['mean_angle']:.3f} "
            f"trial {entry['mean_trial']:.3f} | worst {worst[0]} {worst[1]:.2f}")


def accuracy_summary(log, cfg):
    """The last evaluation's mean accuracies ± their s.e. over the validation trials, with
    the untrained network's (step 0) as the baseline to read them against."""
    last = log[-1]
    parts = [f"{m} {last[f'mean_{m}']:.3f}" + (f" ± {last[f'mean_{m}_se']:.3f}"
                                              if f"mean_{m}_se" in last else "")
             for m in ("angle", "trial")]
    text = (f"mean accuracy {', '.join(parts)} (s.e. over the {cfg['n_valid']} validation "
            f"trials per rule)")
    if log[0]["step"] == 0 and len(log) > 1:
        text += (f", untrained (step 0) angle {log[0]['mean_angle']:.3f}, "
                 f"trial {log[0]['mean_trial']:.3f}")
    return text


def stop_reason(state, cfg):
    if state["step"] >= cfg["max_steps"]:
        return "max_steps"
    if cfg["target_acc"] is not None and state["good_evals"] >= cfg["patience_evals"]:
        return "target_acc"
    if cfg["max_minutes"] is not None and state["elapsed_s"] >= 60 * cfg["max_minutes"]:
        return "max_minutes"
    return None


# ----------------------------------------------------------------------------------------
# The loop


def events(state, ctx, bar):
    """What happens once `state["step"]` steps are done: snapshot, evaluation, checkpoint."""
    cfg = ctx["cfg"]
    step, done = state["step"], stop_reason(state, cfg) is not None
    if step in cfg["snapshot_steps"]:
        save_snapshot(ctx["paths"], ctx["net"], cfg, step)
    scheduled = step % cfg["eval_every"] == 0
    if scheduled or done:
        res = evaluate_rules(ctx["net"], ctx["valid"], cfg)
        entry = on_evaluation(state, res, cfg, ctx["meta"], ctx["opt"], ctx["sched"],
                              ctx["sampler"], scheduled)
        helper.save_json(ctx["paths"].log, {"meta": state["meta"], "evals": state["log"]})
        bar.write(log_line(entry, cfg))
        bar.set_postfix(loss=f"{res['loss']:.4f}", acc=f"{res['mean_' + cfg['acc_measure']]:.3f}")
    state["stop_reason"] = stop_reason(state, cfg)
    if step % cfg["ckpt_every"] == 0 or state["stop_reason"] is not None:
        save_checkpoint(ctx["paths"], ctx["net"], cfg, state, ctx["opt"], ctx["sched"],
                        ctx["sampler"], ctx["rng"])


def kernel_threads(cfg):
    """The compiled kernel's thread chooser of a training run: fixed at cfg["kernel_threads"]
    or $MPN_KERNEL_THREADS where either is set, else adaptive between 1 and 2 threads where
    this process may use 2 cores (mpn_cpp.AdaptiveThreads)."""
    if cfg["kernel_threads"] or os.environ.get("MPN_KERNEL_THREADS"):
        return mpn_cpp.AdaptiveThreads(cfg["kernel_threads"] or mpn_cpp.threads(),
                                       adaptive=False)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return mpn_cpp.AdaptiveThreads(min(2, cores or 1))


def stretch_steps(step, cfg):
    """Steps from `step` to the next scheduled evaluation or max_steps: the rule weights p
    change only at an evaluation, so one p draws all of their batches."""
    return min(cfg["eval_every"] - step % cfg["eval_every"], cfg["max_steps"] - step)


def train_loop(ctx, state, fresh):
    """Steps until a stop reason; a NaN/inf loss leaves the last checkpoint untouched."""
    cfg, rules = ctx["cfg"], ctx["meta"]["rules"]
    bar = helper.progress(total=cfg["max_steps"], initial=state["step"], unit="step")
    feed = batch_feed.BatchFeed(functools.partial(training_batch, cfg, rules), ctx["rng"],
                                forked=cfg["prefetch"] and ctx["device"].type == "cpu")
    try:
        t0 = time.time() - state["elapsed_s"]
        c0 = time.process_time() - state["cpu_s"]  # new_state's 0 where a checkpoint lacks it
        if fresh:
            events(state, ctx, bar)
        chooser = kernel_threads(cfg)
        while stop_reason(state, cfg) is None:
            if cfg["lr_schedule"] == "cosine":
                for group in ctx["opt"].param_groups:
                    group["lr"] = cosine_lr(cfg, state["step"])
            if not feed.left:
                feed.plan(ctx["sampler"].p, stretch_steps(state["step"], cfg))
            batch = feed.next()  # leaves ctx["rng"] as drawing it here would
            with mpn_cpp.using_threads(chooser.threads):
                parts = train_step(ctx["net"], ctx["opt"], batch, cfg, ctx["device"])
            for k, v in parts.items():
                state["train_sums"][k] = state["train_sums"].get(k, 0.0) + v
            state["train_count"] += 1
            state["step"] += 1
            state["elapsed_s"] = time.time() - t0
            state["cpu_s"] = time.process_time() - c0
            bar.update(1)
            if state["step"] % cfg["eval_every"] == 0:  # a stretch ends; logged with the eval
                ran, cores = chooser.update()
                state["kernel"] = {"kernel_threads": ran, "cores": round(cores, 2)}
            with mpn_cpp.using_threads(chooser.threads):
                events(state, ctx, bar)
    except Diverged as err:
        kept = (f"the last good checkpoint (step "
                f"{net_helpers.load_checkpoint(ctx['paths'].checkpoint)['step']}) is kept in "
                f"{str(ctx['paths'].dir)!r}" if ctx["paths"].checkpoint.exists()
                else "no checkpoint was written")
        raise helper.StageError(
            f"training diverged at step {state['step']} ({err}); {kept}; lower --lr or "
            f"change the config and retrain under another --run_tag.") from err
    finally:
        feed.close()
        bar.close()
    return state


# ----------------------------------------------------------------------------------------
# Figures (read the log and the validation set; one function per figure panel)


def plot_losses(ax, log):
    """Validation loss and the training loss terms (means over each evaluation interval)."""
    steps = [e["step"] for e in log]
    ax.plot(steps, [e["loss"] for e in log], color="k", label="validation total")
    ax.plot(steps, [e["loss_mse"] for e in log], color="k", ls="--", label="validation mse")
    for key, color in (("loss", "C0"), ("mse", "C1"), ("weight", "C2"), ("activity", "C3")):
        pts = [(e["step"], e["train"][key]) for e in log if key in e["train"]]
        if pts:
            ax.plot(*zip(*pts), color=color, alpha=0.8, label=f"train {key}")
    ax.set_yscale("log")
    step_axis(ax)
    ax.set_ylabel("loss")
    ax.set_title("losses (train: means between evaluations)", fontsize=9)
    ax.legend(fontsize=7)


def step_axis(ax):
    """Steps in thousands, at most 6 ticks (raw step counts overlap on a 20,000-step run)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(6))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}"))
    ax.set_xlabel("step (thousands)")


def plot_mean_accuracy(ax, log):
    """Mean accuracy with a ±2 s.e. band (over validation trials; entries logged before the
    s.e. existed have none), the worst rule, and the untrained network (step 0) as baseline."""
    steps = np.array([e["step"] for e in log])
    for measure, color in (("angle", "C0"), ("trial", "C1")):
        mean = np.array([e[f"mean_{measure}"] for e in log])
        se = np.array([e.get(f"mean_{measure}_se", np.nan) for e in log])
        ax.plot(steps, mean, color=color, label=f"{measure} (mean over rules, ±2 s.e.)")
        ax.fill_between(steps, mean - 2 * se, mean + 2 * se, color=color, alpha=0.3, lw=0)
        ax.plot(steps, [min(e["acc"][measure].values()) for e in log], color=color, ls=":",
                label=f"{measure} (worst rule)")
        if log[0]["step"] == 0:
            ax.axhline(log[0][f"mean_{measure}"], color=color, ls="--", lw=0.8,
                       label=f"{measure}, untrained (step 0)")
    ax.set_ylim(0, 1.02)
    step_axis(ax)
    ax.set_ylabel("validation accuracy")
    ax.set_title("mean accuracy over rules, and the worst rule", fontsize=9)
    ax.legend(fontsize=7, frameon=True, framealpha=1, edgecolor="none")  # the baselines pass behind it


def plot_accuracy_heatmap(ax, log, rules, measure):
    acc = np.array([[e["acc"][measure][r] for e in log] for r in rules])
    steps = [e["step"] for e in log]
    im = ax.imshow(acc, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(8, len(steps))).astype(int))
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
    ax.set_yticks(range(len(rules)), rules)
    ax.set_xlabel("step")
    ax.set_title(f"{measure} accuracy per rule")
    ax.figure.colorbar(im, ax=ax, label="accuracy")


def plot_sampling(ax, log, rules, rules_per_batch=1):
    """Each rule's expected share of a step's trials: its sampling weight p with one rule per
    step; with k > 1 rules per step (drawn without replacement) its inclusion probability / k,
    which is flatter than p (no rule can be in more than every step)."""
    steps = [e["step"] for e in log]
    p = np.array([[e["p"][r] for r in rules] for e in log])
    share = inclusion_probabilities(p, rules_per_batch) / rules_per_batch
    colors = plt_colors(len(rules))
    ax.stackplot(steps, share.T, labels=rules, colors=colors, alpha=0.9, step="post")
    ax.set_xlim(steps[0], steps[-1] if steps[-1] > steps[0] else steps[0] + 1)
    ax.set_ylim(0, 1)
    step_axis(ax)
    ax.set_ylabel("expected share of a step's trials")
    ax.set_title("rule sampling: one rule per step, drawn by weight p" if rules_per_batch == 1
                 else f"rule sampling: {rules_per_batch} rules per step, drawn without "
                      f"replacement by weight p", fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], fontsize=6, loc="center left",
              bbox_to_anchor=(1.0, 0.5))  # top-down, as stacked


def plt_colors(n):
    import matplotlib
    cmap = matplotlib.colormaps["tab20"]
    return [cmap(i % 20) for i in range(n)]


def plot_trial_inputs(ax, trial):
    t = np.arange(trial["length"]) * mpn_tasks.DT_MS
    u = trial["inputs"][: trial["length"]]
    names = ["fixation", "go cue", "ring1 sin", "ring1 cos", "ring2 sin", "ring2 cos"]
    for ch, name in enumerate(names[: min(6, u.shape[1])]):
        ax.plot(t, u[:, ch], lw=1, label=name, drawstyle="steps-post")
    ax.set_ylim(-1.2, 1.2)
    ax.set_ylabel("input")
    _epoch_lines(ax, trial["epochs"])


def plot_trial_outputs(ax, trial):
    n = trial["length"]
    t = np.arange(n) * mpn_tasks.DT_MS
    weight = trial["mask"][:n].max(axis=1)
    for lo, hi, alpha in ((0, 1.5, 0.08), (1.5, np.inf, 0.2)):
        on = (weight > lo) & (weight <= hi)
        ax.fill_between(t, -1.2, 1.2, where=on, step="mid", color="grey", alpha=alpha, lw=0)
    for ch, name in enumerate(["fixation", "sin", "cos"][: trial["outputs"].shape[1]]):
        ax.plot(t, trial["outputs"][:n, ch], color=f"C{ch}", lw=1.2, label=f"{name} out")
        ax.plot(t, trial["targets"][:n, ch], color=f"C{ch}", lw=1, ls="--",
                drawstyle="steps-post")
    ax.plot([], [], color="k", ls="--", lw=1, label="target")
    ax.fill_between([], [], color="grey", alpha=0.3, label="cost mask (dark: weight 5)")
    ax.set_ylim(-1.2, 1.2)
    ax.set_ylabel("output")
    ax.set_xlabel("time (ms)")
    _epoch_lines(ax, trial["epochs"], label=False)


def _epoch_lines(ax, epochs, label=True):
    for name, (start, stop) in epochs.items():
        if start >= 0:
            ax.axvline(start * mpn_tasks.DT_MS, color="k", lw=0.5, alpha=0.5)
            if label:
                ax.text(start * mpn_tasks.DT_MS, ax.get_ylim()[1], name, fontsize=5,
                        va="bottom")


@torch.no_grad()
def example_trials(net, valid):
    """The first validation trial of each rule with the network's outputs (numpy)."""
    net.eval()
    device = next(net.parameters()).device
    trials = {}
    for rule, batch in valid.items():
        n = int(batch.length[0])
        y = net(torch.as_tensor(batch.inputs[:1, :n], device=device))["y"][0].cpu().numpy()
        trials[rule] = {"inputs": batch.inputs[0, :n], "targets": batch.targets[0, :n],
                        "mask": batch.mask[0, :n], "outputs": y, "length": n,
                        "epochs": {k: tuple(int(x) for x in v[0]) for k, v in batch.epochs.items()},
                        "correct": None}
    return trials


def make_figures(paths, log, rules, trials, rules_per_batch=1):
    import matplotlib.pyplot as plt
    helper.set_style()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    plot_losses(axes[0], log)
    plot_mean_accuracy(axes[1], log)
    helper.save_figure(fig, paths.figure("training_curves"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.3 * len(rules) + 1.5), layout="constrained")
    for ax, measure in zip(axes, ("trial", "angle")):
        plot_accuracy_heatmap(ax, log, rules, measure)
    helper.save_figure(fig, paths.figure("training_accuracy_heatmap"))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    plot_sampling(ax, log, rules, rules_per_batch)
    helper.save_figure(fig, paths.figure("training_sampling"))
    n_cols = min(3, len(rules))
    n_rows = math.ceil(len(rules) / n_cols)
    fig = plt.figure(figsize=(4.2 * n_cols, 3.0 * n_rows), layout="constrained")
    for i, (sub, rule) in enumerate(zip(fig.subfigures(n_rows, n_cols).ravel(), rules)):
        ax_in, ax_out = sub.subplots(2, 1, sharex=True)
        plot_trial_inputs(ax_in, trials[rule])
        plot_trial_outputs(ax_out, trials[rule])
        sub.suptitle(rule, fontsize=9)
        if i == 0:
            handles = [h for ax in (ax_in, ax_out) for h in ax.get_legend_handles_labels()[0]]
    fig.legend(handles=handles, loc="outside lower center", ncol=6, fontsize=7)
    helper.save_figure(fig, paths.figure("training_example_trials"))


# ----------------------------------------------------------------------------------------


def main(cfg):
    """Train (or continue) the run of `cfg`. Returns dict(paths=RunPaths, step, stop_reason,
    final=last log entry (loss, acc per rule under both measures, means), log=all entries).
    The run folder is locked against other writers for the whole run."""
    helper.check_config(cfg, CONFIG)
    meta = derived(cfg)
    paths = helper.run_paths(cfg)
    with helper.run_lock(paths.dir):
        return train(cfg, meta, paths)


def train(cfg, meta, paths):
    """The body of main, under the run folder's lock."""
    resume = check_run_folder(cfg, paths)
    if cfg["num_threads"]:
        torch.set_num_threads(cfg["num_threads"])
    device = helper.get_device(cfg["device"])
    helper.seed_all(cfg["seed"])
    net, opt, sched = build(cfg, meta, device)
    sampler = AdaptiveSampler(len(meta["rules"]), meta["p_min"],
                              adaptive=cfg["sampling"] == "adaptive")
    rng = np.random.default_rng([cfg["seed"], 2])
    state = dict(new_state(), meta=dict(meta, n_params=net.n_trainable(), run=paths.name))
    if resume:
        restore(paths, net, opt, sched, sampler, rng, state)
    helper.save_json(paths.config, normalised(cfg))
    print(f"run {paths.name}: {cfg['net']} N={cfg['n_hidden']} ({state['meta']['n_params']} "
          f"parameters), {len(meta['rules'])} rules, on {device}, in {paths.dir}")
    valid = validation_set(cfg, meta["rules"])
    ctx = dict(cfg=cfg, meta=meta, paths=paths, net=net, opt=opt, sched=sched,
               sampler=sampler, rng=rng, valid=valid, device=device)
    train_loop(ctx, state, fresh=not resume)
    if not state["log"]:  # log.json was removed from a finished run: score it once more
        on_evaluation(state, evaluate_rules(net, valid, cfg), cfg, meta, opt, sched, sampler,
                      scheduled=False)
    last = state["log"][-1]
    if state["step"] not in cfg["snapshot_steps"]:
        save_snapshot(paths, net, cfg, state["step"])
    if cfg["figures"]:
        make_figures(paths, state["log"], meta["rules"], example_trials(net, valid),
                     cfg["rules_per_batch"])
    print(f"stopped at step {state['step']} ({state['stop_reason']}); "
          f"{accuracy_summary(state['log'], cfg)}; run folder {paths.dir}")
    if state["stop_reason"] == "max_minutes":  # say how to finish (max_minutes is resumable)
        more = math.ceil(1.1 * state["elapsed_s"] / 60 * cfg["max_steps"] / max(state["step"], 1))
        print(f"max_minutes={cfg['max_minutes']:g} stopped training before max_steps="
              f"{cfg['max_steps']}; to continue from step {state['step']}, rerun the same "
              f"command with --max_minutes={more} (total minutes, counted over resumes).")
    return {"paths": paths, "step": state["step"], "stop_reason": state["stop_reason"],
            "final": last, "log": state["log"]}


if __name__ == "__main__":
    helper.run_main(main, CONFIG)
