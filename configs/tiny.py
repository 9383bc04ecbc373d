# A few-second run of all 15 rules for tests of the later stages (not a trained network).
#   python multiple_task.py configs/tiny.py
n_hidden = 16
batch_size = 16
max_steps = 30
eval_every = 10
n_valid = 8
ckpt_every = 10
snapshot_steps = [0, 1, 32]
device = "cpu"
