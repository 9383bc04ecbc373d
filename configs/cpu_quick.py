# The preset to run first on a laptop or workstation CPU: all 15 rules, a small dmpn
# (N = 64, batch 32) trained with a higher learning rate that the plateau scheduler anneals.
# About 15-20 minutes on 2 cores with the compiled engine (engine="auto").
#   python multiple_task.py configs/cpu_quick.py
#   python run_pipeline.py configs/cpu_quick.py      # the whole pipeline
ruleset = "everything"
net = "dmpn"
n_hidden = 64
batch_size = 32
lr = 3e-3
lr_factor = 0.7  # anneal faster than the paper's 0.95 ...
lr_patience = 5  # ... after 5 evaluations (1,000 steps) without a better validation loss
max_steps = 15000
max_minutes = 19.0  # safety cap on a slow machine; the step count normally ends training first
eval_every = 200
n_valid = 64
acc_measure = "angle"
ckpt_every = 1000
device = "cpu"
