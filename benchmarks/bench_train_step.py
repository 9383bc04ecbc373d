"""Where a training step of the CPU preset spends its time, per part, on 1 and 2 kernel threads.

Builds the network of `configs/cpu_quick.py` (or the config given), draws training batches as
multiple_task does (uniform rule probabilities) and times --steps steps after --warmup, split
into: batch (mpn_tasks.random_batch), to_torch, forward, loss, backward (the compiled
kernel's reverse pass and the small ops around it), opt (clip, Adam, clamp). Also times one
validation pass (15 rules x n_valid trials, forward only; the preset runs one every
eval_every steps) and prints ms per step with it spread over eval_every steps. Wall and
process CPU time; on 2 idle cores the kernel's threads run side by side (CPU > wall).

With --prefetch=on the batches come from batch_feed's forked child, as training draws them
(prefetch = True): "batch" is then the wait for the child's next batch, and "step CPU"
leaves out the child's drawing (this process's CPU time only). --prefetch=both
times both ways, one after the other, per thread count.

The weights after the timed steps are hashed: they must be the same for every thread count
(the kernel's result does not depend on its threads).

Example:
    python benchmarks/bench_train_step.py                       # 300 steps, threads 1 and 2
    python benchmarks/bench_train_step.py --threads=2 --steps=1000 -- --rules_per_batch=4
    python benchmarks/bench_train_step.py --threads=2 --p_from=runs/<run>/log.json
    python benchmarks/bench_train_step.py --threads=2 --prefetch=both   # batches drawn
                       # in the loop, then by a forked child as training does (batch_feed)
Arguments after `--` are config overrides, as for multiple_task.py.
"""
import argparse
import functools
import hashlib
import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import batch_feed  # noqa: E402
import helper  # noqa: E402
import mpn_cpp  # noqa: E402
import multiple_task  # noqa: E402
import net_helpers  # noqa: E402

PARTS = ("batch", "to_torch", "forward", "loss", "backward", "opt")


def time_steps(cfg, threads, steps, warmup, p=None, prefetch=False):
    """ms per step of each part (wall), wall and CPU ms per step, eval seconds, weight hash.
    p: the rule sampling weights (uniform by default); prefetch: batches from a forked
    child (batch_feed), planned eval_every steps at a time as in training."""
    torch.manual_seed(0)
    meta = multiple_task.derived(cfg)
    net, opt, _ = multiple_task.build(cfg, meta, torch.device("cpu"))
    rules = meta["rules"]
    p = np.full(len(rules), 1.0 / len(rules)) if p is None else p
    rng = np.random.default_rng(0)
    sums = dict.fromkeys(PARTS, 0.0)
    draw = functools.partial(multiple_task.training_batch, cfg, rules)
    with mpn_cpp.using_threads(threads), batch_feed.BatchFeed(draw, rng, prefetch) as feed:
        for i in range(warmup + steps):
            if i == warmup:
                sums = dict.fromkeys(PARTS, 0.0)
                wall0, cpu0 = time.perf_counter(), time.process_time()
            if not feed.left:
                feed.plan(p, cfg["eval_every"])
            t = [time.perf_counter()]
            batch = feed.next()
            t.append(time.perf_counter())
            batch_t = net_helpers.batch_to_torch(batch, "cpu")
            t.append(time.perf_counter())
            out = net(batch_t["inputs"])
            t.append(time.perf_counter())
            loss, _ = net_helpers.compute_loss(out, batch_t, net, cfg["weight_reg"],
                                               cfg["activity_reg"])
            t.append(time.perf_counter())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t.append(time.perf_counter())
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg["grad_clip"])
            opt.step()
            net.clamp_parameters()
            t.append(time.perf_counter())
            for k, name in enumerate(PARTS):
                sums[name] += t[k + 1] - t[k]
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        valid = multiple_task.validation_set(cfg, rules)
        e0 = time.perf_counter()
        multiple_task.evaluate_rules(net, valid, cfg)
        eval_s = time.perf_counter() - e0
    digest = hashlib.sha1(b"".join(v.detach().numpy().tobytes()
                                   for v in net.state_dict().values())).hexdigest()[:12]
    per = {k: 1000 * v / steps for k, v in sums.items()}
    return per, 1000 * wall / steps, 1000 * cpu / steps, eval_s, digest


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/cpu_quick.py")
    ap.add_argument("--threads", default="1,2", help="kernel thread counts, comma-separated")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--p_from", default=None,
                    help="a run's log.json: draw rules by its last evaluation's sampling "
                         "weights, as training does then (adaptive sampling favours the long "
                         "decision-making trials), instead of uniformly")
    ap.add_argument("--prefetch", default="off", choices=("off", "on", "both"),
                    help="draw the batches in the loop (off), in a forked child as training "
                         "does (on), or time both")
    args, overrides = ap.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    os.chdir(Path(__file__).resolve().parent.parent)
    cfg = helper.load_config(multiple_task.CONFIG, [args.config] + overrides, echo=False)
    torch.set_num_threads(cfg["num_threads"] or 1)
    if mpn_cpp.kernel() is None:
        print("compiled kernel unavailable: timing the 'fast' engine")
    p = None
    if args.p_from:
        last = helper.load_json(args.p_from)["evals"][-1]
        rules = multiple_task.derived(cfg)["rules"]
        p = np.array([last["p"][r] for r in rules])
        print(f"rules drawn by the sampling weights of {args.p_from} at step {last['step']}")
    print(f"{args.config} {' '.join(overrides)}: N = {cfg['n_hidden']}, batch "
          f"{cfg['batch_size']}, {args.steps} steps after {args.warmup}; torch threads "
          f"{torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}")
    head = ["kernel threads", "prefetch", *PARTS, "step wall", "step CPU",
            f"eval (s, /{cfg['eval_every']} steps)", "wall + eval", "steps/s", "weights"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    ways = {"off": (False,), "on": (True,), "both": (False, True)}[args.prefetch]
    for threads, prefetch in itertools.product((int(t) for t in args.threads.split(",")), ways):
        per, wall, cpu, eval_s, digest = time_steps(cfg, threads, args.steps, args.warmup, p,
                                                    prefetch)
        with_eval = wall + 1000 * eval_s / cfg["eval_every"]
        cells = [str(threads), "on" if prefetch else "off", *(f"{per[k]:.2f}" for k in PARTS),
                 f"{wall:.1f}", f"{cpu:.1f}", f"{eval_s:.2f}", f"{with_eval:.1f}", f"{1000 / with_eval:.1f}", digest]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
