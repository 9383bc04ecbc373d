#!/usr/bin/env bash
# One-shot check of every CUDA path, for the first minutes on a GPU workstation (no network).
#   (a) the tests marked `cuda` (tests/test_cuda.py): every engine on CUDA against the reference
#       loop on the CPU in float64 and float32, lesion batched = one at a time, checkpoints
#       moved between devices; engine "fused" (torch.compile, Triton) apart, as it compiles
#   (b) benchmarks/bench_engine.py (fast and fused engines) and bench_models.py on CUDA at
#       the paper size (N = 300, B = 128, T = 100)
#   (c) the paper preset (configs/paper.py) trained for ~30 s with the default engine and
#       ~60 s (its compile included) with engine "fused": steps/s of each
#   (d) the pipeline up to the lesion stage on a tiny run, on CUDA
# then prints one table. Every part has its own time limit; the limits sum to 8.4 minutes.
# Without a GPU it says so and exits 0.
#
#   bash benchmarks/gpu_check.sh              # logs and runs in a temporary folder
#   GPU_CHECK_OUT=gpu_check bash benchmarks/gpu_check.sh   # keep them in ./gpu_check
#   GPU_CHECK_TRAIN_MIN=0.3 bash benchmarks/gpu_check.sh   # shorter part (c) when GPU time is short
#   GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh       # dry run of this script on the CPU
#                                    (tests the script and its table, not CUDA; parts time out)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEV=${GPU_CHECK_DEVICE:-cuda}
export MPN_TEST_DEVICE=$DEV

if [ "$DEV" = cuda ] && ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no GPU (torch.cuda.is_available() is False); nothing to check."
    exit 0
fi

MISSING=$($PY -c "
import importlib.util as u
print(' '.join(m for m in ('h5py', 'hdf5plugin', 'scipy', 'sklearn', 'matplotlib', 'tqdm') if u.find_spec(m) is None))")
if [ -n "$MISSING" ]; then  # part (d) needs them all (a GPU box once lacked hdf5plugin)
    echo "gpu_check: this Python lacks $MISSING; run 'pip install -r requirements.txt' first."
    exit 1
fi

OUT=${GPU_CHECK_OUT:-$(mktemp -d -t gpu_check.XXXX)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name() if '$DEV' == 'cuda' else 'CPU (dry run)', '| torch', torch.__version__, '| CUDA', torch.version.cuda)")
echo "gpu_check: $GPU; logs in $OUT"
ROWS=()

# part NAME LIMIT_S COMMAND...: run one part with a time limit, logging to $OUT/NAME.log
part() {
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local status=ok
    [ $rc -eq 124 ] && status=TIMEOUT
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="FAIL($rc)"
    LAST_STATUS=$status
    LAST_SECONDS=$((SECONDS - t0))
}

# (a) the CUDA tests
part a_tests 65 $PY -m pytest -q -m cuda tests/test_cuda.py -k "not fused"
ROWS+=("a  cuda tests|$LAST_STATUS|$LAST_SECONDS|$(grep -E '(passed|failed|error)' "$OUT/a_tests.log" | tail -1)")
part a_fused 90 $PY -m pytest -q -m cuda tests/test_cuda.py -k fused
ROWS+=("a  cuda tests (fused)|$LAST_STATUS|$LAST_SECONDS|$(grep -E '(passed|failed|error)' "$OUT/a_fused.log" | tail -1)")

# (b) engines and models at the paper size; the table's last three columns are "fused"
part b_engine 100 $PY benchmarks/bench_engine.py --device=$DEV --sizes=300,128,100 --quick --ref_steps=10
ROWS+=("b  bench_engine fwd+bwd|$LAST_STATUS|$LAST_SECONDS|$(grep -E '^ *300 +128 +100 +grad' "$OUT/b_engine.log" | tr -s ' ' | cut -c1-60) ... fused:$(grep -E '^ *300 +128 +100 +grad' "$OUT/b_engine.log" | awk -F'|' '{print $NF}' | tr -s ' ')")
ROWS+=("b  bench_engine no-grad| | |$(grep -E '^ *300 +128 +100 +nograd' "$OUT/b_engine.log" | tr -s ' ' | cut -c1-60) ... fused:$(grep -E '^ *300 +128 +100 +nograd' "$OUT/b_engine.log" | awk -F'|' '{print $NF}' | tr -s ' ')")
part b_models 30 $PY benchmarks/bench_models.py --device=$DEV --quick
ROWS+=("b  bench_models (T=20)|$LAST_STATUS|$LAST_SECONDS|$(grep -E "^$DEV +dmpn +300" "$OUT/b_models.log" | tr -s ' ' | cut -c1-80)")

# (c) the paper preset: ~30 s of training with the default engine, ~60 s with "fused"
TRAIN_MIN=${GPU_CHECK_TRAIN_MIN:-0.5}  # minutes of default-engine training in part (c)
FUSED_MIN=$($PY -c "print(round(2 * float('$TRAIN_MIN'), 2))")  # "fused" first compiles
rate() {  # steps/s between the first and the last evaluation after step 0 of run tag $1
$PY - "$OUT/runs" "$1" <<'EOF'
import json, sys, pathlib
logs = list(pathlib.Path(sys.argv[1]).glob(f"*{sys.argv[2]}*/log.json"))
ev = [e for e in json.loads(logs[0].read_text())["evals"] if e["step"] > 0] if logs else []
if len(ev) < 2:
    print("no rate: fewer than two evaluations after step 0")
else:
    s = (ev[-1]["step"] - ev[0]["step"]) / (ev[-1]["wall_s"] - ev[0]["wall_s"])
    print(f"{s:.1f} steps/s = {1e3 / s:.0f} ms/step (evals incl.); step {ev[-1]['step']}, "
          f"angle {ev[-1]['mean_angle']:.3f}")
EOF
}
part c_paper 55 $PY multiple_task.py configs/paper.py --device=$DEV --max_minutes=$TRAIN_MIN \
    --figures=False --runs_dir="$OUT/runs" --run_tag=gpucheck
ROWS+=("c  paper preset training|$LAST_STATUS|$LAST_SECONDS|$(rate gpucheck)")
part c_fused 95 $PY multiple_task.py configs/paper.py --device=$DEV --max_minutes=$FUSED_MIN \
    --engine=fused --figures=False --runs_dir="$OUT/runs" --run_tag=gpufused
ROWS+=("c  same, engine fused|$LAST_STATUS|$LAST_SECONDS|$(rate gpufused)")

# (d) a tiny run through the lesion stage on CUDA
part d_lesion 70 env MPN_RUNS_DIR="$OUT/tiny" $PY run_pipeline.py configs/tiny.py --device=$DEV \
    --stages=train,analyze,cluster,lesion --stability_seeds=1 --stability_epoch_quantiles=[0.5] \
    --n_groups=20 --n_restarts=2 --n_random=2 --n_random_combined=1 --n_draws=2 --trials_per_rule=8 \
    --figures=False
LES=$($PY - "$OUT/tiny" <<'EOF'
import json, sys, pathlib
p = list(pathlib.Path(sys.argv[1]).glob("*/pipeline.json"))
st = json.loads(p[0].read_text()) if p else {}
print(", ".join(f"{k} {v['seconds']} s" for k, v in st.items()) or "no stage finished")
EOF
)
ROWS+=("d  tiny run -> lesion|$LAST_STATUS|$LAST_SECONDS|$LES")

echo
echo "gpu_check on $GPU"
printf '%-26s %-9s %6s  %s\n' "part" "status" "s" "result"
for row in "${ROWS[@]}"; do
    IFS='|' read -r name status secs result <<< "$row"
    printf '%-26s %-9s %6s  %s\n' "$name" "$status" "$secs" "$result"
done
echo "(logs: $OUT)"
