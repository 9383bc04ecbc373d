# dmpn vs leaky RNN vs GRU on a CPU, several seeds each: the preset behind docs/results.md.
#   python run_pipeline.py configs/cpu_compare.py --nets=dmpn,vanilla,gru --seeds=1,2,3,4,5 --jobs=2
#   (it ends with seed_summary.py, which writes docs/results.md; alone:
#    python seed_summary.py --runs="everything_*_cmp" --page=docs/results.md --preset=configs/cpu_compare.py)
# Matched N (64 hidden units each), not matched parameter counts: the analyses compare hidden
# units (task variance, clusters, lesions) and hidden states (CKA, Procrustes) one for one, so
# equal N keeps their dimensions and null models equal. Parameters then differ (dmpn 64 x 64
# plastic + 21 x 64 embedding ~ 5.8k; leaky RNN ~ 5.6k; GRU ~ 16.8k, three gates).
# Same data for all: 15 rules, batch 32, the plateau learning-rate schedule cpu_quick.py used
# before its cosine (the runs behind docs/results.md were made with it), cut to 12,000 steps
# so 5 seeds x 3 architectures finish in about 1.5 h on 2 cores (per step at N = 64 on one
# thread the GRU costs ~2x and the leaky RNN ~1.7x the dmpn's compiled kernel).
ruleset = "everything"
n_hidden = 64
batch_size = 32
lr = 3e-3
lr_factor = 0.7
lr_patience = 5
max_steps = 12000
max_minutes = 30.0  # safety cap on a busy machine (resumes with a larger value)
eval_every = 200
n_valid = 128
acc_measure = "trial"  # the strict measure drives rule sampling, for every architecture alike
ckpt_every = 1000
device = "cpu"
num_threads = 1
run_tag = "cmp"  # keeps these runs apart from cpu_quick's
# lesions: single-cluster lesions (the specificity measure) and synapse-cluster lesions of the
# dmpn at the fixed k, with fewer trials and controls than the full suite (a dict named after
# a stage holds keys for that stage alone: trials_per_rule is every analysis stage's key)
lesion = dict(experiments=["single", "modulation"], forms=["normalized"], k_cuts=["fixed"],
              mod_reps=["modulation"], trials_per_rule=64, n_random=10)
# the cross-run summary run_pipeline calls at the end (seed_summary.py)
page = "docs/results.md"
