# The published setting (SPEC §4, "L21e4"): all 15 rules, dmpn with N = 300, batch 128,
# 100,000 Adam steps. Meant for a GPU (hours on a CPU).
#   python multiple_task.py configs/paper.py
ruleset = "everything"
net = "dmpn"
n_hidden = 300
batch_size = 128
lr = 1e-3
weight_reg = 1e-4
activity_reg = 1e-4
grad_clip = 10.0
max_steps = 100000
eval_every = 100
n_valid = 128
sampling = "adaptive"
acc_measure = "trial"
target_acc = None
ckpt_every = 1000
device = "auto"
