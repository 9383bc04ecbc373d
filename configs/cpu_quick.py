# The preset to run first on a laptop or workstation CPU: all 15 rules, a small dmpn
# (N = 64, batch 32 = 4 rules x 8 trials per step) trained with a higher learning rate
# annealed along a half cosine over 32,000 steps.
#   python multiple_task.py configs/cpu_quick.py
#   python run_pipeline.py configs/cpu_quick.py      # the whole pipeline
# For a quick look add --max_steps=8000 --lr_decay_steps=8000 (about 3 minutes of training).
# Accuracy per step is deterministic on a given CPU type, whatever its load and core count
# (the kernel's result does not depend on its threads, and num_threads = 1 fixes torch's).
# Mean accuracy angle / trial at the end: 0.900 / 0.972 with the default seed, 0.893 / 0.970
# over 3 seeds (0.900, 0.898, 0.881 angle; README "Measured"). Two departures from SPEC §4, both for accuracy per CPU second
# (benchmarks/bench_preset_frontier.py prints the recipes compared):
# - the learning rate falls along a half cosine to ~0 (SPEC's plateau schedule, kept by
#   configs/paper.py, anneals on a noisy validation loss and needed 45,000 steps for what a
#   20,000-step cosine reaches);
# - each step draws 4 different rules (8 trials each) instead of one: 0.900 / 0.972 after
#   32,000 steps against 0.880 / 0.969 for one rule over 36,000, in about the same time (a
#   step costs ~18% more, drawing 4 batches; padding trials to the longest rule costs
#   nothing, as the kernel skips padded steps).
# The reference-compatible `angle` measure saturates near 0.90 at N = 64 (a 44,000-step run
# ends at 0.902): on no-go steps both response outputs must stay under 0.05, and dmsgo stays
# near 0.66 under it. SPEC's weight penalty (weight_reg = 1e-4) sets that ceiling: --weight_reg=1e-5
# lifts `angle` by 0.016 on each of 3 seeds (README "Measured"), but changes the model, so it is
# not the default. The 19-minute cap bounds the run on a slow or busy machine; its last
# line says how to continue (--max_minutes=<more> resumes).
ruleset = "everything"
net = "dmpn"
n_hidden = 64  # per step 0.4-0.6x the cost of N = 128, and learns as fast per step
batch_size = 32
rules_per_batch = 4  # SPEC §4 says 1; 4 learn more per CPU second (see above)
lr = 3e-3
lr_schedule = "cosine"
lr_decay_steps = 32000  # the whole run: extending it later continues at the floor lr
max_steps = 32000  # ~12 minutes on 2 idle cores at ~44 steps/s, evaluations included (and ~1 minute building the kernel, once per machine)
max_minutes = 19.0  # safety cap on a slow machine; the step count normally ends training first
eval_every = 200
n_valid = 128  # 64 leaves a per-rule accuracy noise of ~0.06, too much for a >= 0.5 check
acc_measure = "angle"  # sample the rules weakest under `angle`, the measure that rises slowest here (SPEC §3 calls `trial` the strict one and samples by it: over 3 seeds 0.878 / 0.977 against 0.893 / 0.970, README "Measured")
target_acc = None
ckpt_every = 1000
device = "cpu"
num_threads = 1  # torch's own ops: at N = 64 a second OpenMP thread gains nothing and, spinning between ops, collapses the speed on a busy machine; the compiled kernel runs threads of its own, 2 while a second core is free (kernel_threads = 0) {>= 0}
