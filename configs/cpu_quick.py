# The first run for a person without a GPU: all 15 rules, a small dmpn, <= 20 minutes on
# 2 CPU cores (engine "auto" = the compiled "cpp" kernel).
#   python multiple_task.py configs/cpu_quick.py
# Measured on 2 shared cores: 0.03-0.06 s/step quiet, 0.1-0.25 s/step under load; one
# evaluation (15 x 128 trials) ~1.3 s. The development run of this recipe (64 validation
# trials per rule) reached mean accuracy angle / trial 0.61 / 0.71 at 1,000 steps,
# 0.78 / 0.89 at 5,000, 0.81 / 0.90 at 10,000 and 0.84 / 0.93 at 14,000; every rule's
# trial accuracy >= 0.5 at every evaluation from ~6,000 steps on. The reference-compatible
# `angle` measure stays below 0.9: on dms/dmc no-go trials both response outputs must stay
# under 0.05, and the delay-dm rules plateau near 0.7-0.8.
# max_minutes caps the wall time on a busy machine (the run then stops early, at a step that
# depends on the load); on a quiet one max_steps ends it first.
n_hidden = 64  # N: per step 0.4-0.6x the cost of N = 128, and learns as fast per step
batch_size = 32
lr = 3e-3
lr_factor = 0.7  # anneal faster than the paper (0.95 after 30 evaluations): the accuracy
lr_patience = 5  # keeps rising as the lr falls
acc_measure = "angle"  # sample the rules that are weakest under the stricter measure
eval_every = 200
n_valid = 128
target_acc = None
max_steps = 20000
max_minutes = 19.0
ckpt_every = 1000
device = "cpu"
