#!/usr/bin/env bash
# Everything we measure on a GPU, in one go (a lent GPU machine comes for minutes, not hours):
#   1. batched EM vs sklearn (benchmarks/gmm_fit.py --device cuda),
#   2. step cost per method at paper scale (ResNet-101, crop 512, bf16 autocast) with the host–device
#      synchronisations counted (benchmarks/step_cost.py --device cuda),
#   3. precision, memory format and torch.compile: self-training's and LPCGMA's step under bf16 (with the
#      host–device synchronisations counted), channels_last, channels_last + torch.compile, float32 and
#      float16 autocast (benchmarks/step_cost.py --set …),
#   4. label-free model selection (issue 8): Ray-free random sweeps (experiments/selection_study.py
#      --runner local, every trial to the end, the defaults first) on the real-tile cross-sensor task and
#      on the synthetic benchmark at budgets where the models learn; analysed later with --experiment,
#   5. the methods tables (the calibrated synthetic task and the real-tile cross-sensor task, 3 seeds,
#      each method adapting the seed's shared source model: longer schedules than a CPU allows) trained
#      N runs at a time (experiments/compare_methods.py --jobs), until the time budget is spent;
#      finished runs and source models are kept, so a rerun (here or elsewhere) picks up where this stopped.
#
#   OUT=gpu_out LOVEDA_ROOT=path/to/loveda_sample BUDGET_S=540 bash benchmarks/gpu_suite.sh
#   SECTIONS="precision" BUDGET_S=500 bash benchmarks/gpu_suite.sh     # only some sections (em steps precision compare selection)
#
# Needs torch, torchvision, numpy, pillow, pyyaml, tqdm, scikit-learn (no Ray or MLflow: tracking is
# off). Runs from the repository root without installing the package.
set -u
OUT=${OUT:-gpu_out}
LOVEDA_ROOT=${LOVEDA_ROOT:-../shared/data/loveda_sample}
BUDGET_S=${BUDGET_S:-540}
JOBS=${JOBS:-8}
DEVICE=${DEVICE:-cuda}              # DEVICE=cpu STEP_ARGS="--backbone resnet18 --crop 64" EXTRA="train.iters=2": a dry run
STEP_ARGS=${STEP_ARGS:---backbone resnet101 --crop 512 --batch 2}
read -r -a EXTRA <<< "${EXTRA:-}"
RUNS=${RUNS:-runs/compare_gpu}
SECTIONS=" ${SECTIONS:-em steps precision compare} "   # also: selection
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true
start=$(date +%s)
left() { echo $((start + BUDGET_S - $(date +%s))); }
section() { [[ $SECTIONS == *" $1 "* ]]; }

nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.get_device_name())"

if section em; then
  echo "## EM" | tee "$OUT/gmm_fit.md"
  for samples in 20000 100000; do
    timeout 120 python3 benchmarks/gmm_fit.py --device "$DEVICE" --samples $samples --repeats $((samples > 50000 ? 3 : 5)) 2>&1 | tee -a "$OUT/gmm_fit.md"
  done
fi

if section steps; then
  # shellcheck disable=SC2086
  timeout 240 python3 benchmarks/step_cost.py --device "$DEVICE" $STEP_ARGS --ablations --profile-steps 0 2>&1 | tee "$OUT/step_cost_r101.md"
fi

if section precision; then  # most telling first; each variant in one file, syncs counted under the default (bf16)
  variants=("" "train.channels_last=true" "train.channels_last=true train.compile=true" "train.amp=false"
            "train.amp_dtype=float16")
  for i in "${!variants[@]}"; do
    read -r -a sets <<< "${variants[$i]}"
    set_args=(); for kv in "${sets[@]}"; do set_args+=(--set "$kv"); done
    methods=(self_training lpcgma); syncs=0
    if [ "$i" -eq 0 ]; then methods+=("lpcgma lean"); syncs=2; fi
    t=$(( $(left) - 10 ))
    if [ "$t" -lt 30 ]; then echo "no time left for variant '${variants[$i]}'"; break; fi
    # shellcheck disable=SC2086
    timeout --kill-after=5 "$t" python3 benchmarks/step_cost.py --device "$DEVICE" $STEP_ARGS --methods "${methods[@]}" \
      --steps "${PRECISION_STEPS:-20}" --sync-steps $syncs --profile-steps 0 "${set_args[@]}" 2>&1 | grep -v Warning | tee "$OUT/precision_$i.md"
  done
fi

if section selection; then  # the real-tile sweep gets REAL_SHARE % of what is left, the synthetic one the rest
  sweep() {  # name, budget_s, selection_study args…
    local name=$1 budget=$2; shift 2
    if [ "$budget" -lt 60 ]; then echo "no time left for sweep $name"; return; fi
    timeout --kill-after=10 $((budget + 30)) python3 experiments/selection_study.py --run --runner local --no-analysis \
      --jobs "${SWEEP_JOBS:-16}" --num-samples "${SWEEP_TRIALS:-16}" --storage "$RUNS" --name "$name" \
      --budget-s "$budget" "$@" "${EXTRA[@]}" 2>&1 | grep -v Warning | tee -a "$OUT/selection.log"
  }
  sweep selection_cross_sensor $(( ($(left) - 40) * ${REAL_SHARE:-60} / 100 )) --config loveda_sample \
    "data.root=$LOVEDA_ROOT" train.iters="${REAL_ITERS:-1500}" train.eval_every=250 train.checkpoint_every=250 \
    method.gmm_warmup_iters=250 method.gmm_refit_every=250
  sweep selection_synthetic $(( $(left) - 40 )) --config synthetic train.iters="${SYN_ITERS:-800}" \
    train.eval_every=200 train.checkpoint_every=200 train.log_every=50 method.gmm_warmup_iters=100 method.gmm_refit_every=100
  tar czf "$OUT/selection_runs.tgz" $(find "$RUNS"/selection_* -name result.json -o -name params.json -o -name sweep.json) 2>/dev/null
fi

# the two-stage protocol (issue 20): every method of seed s adapts seed s's shared source model
two_stage=(source_stage.enabled=true optim.lr=0.0002 optim.warmup_iters=0 method.gmm_warmup_iters=100
           method.gmm_refit_every=100)
synthetic=("${two_stage[@]}" source_stage.iters="${SYN_SOURCE_ITERS:-3000}" train.iters="${SYN_ITERS:-2000}"
           train.eval_every=500 train.checkpoint_every=500)
cross_sensor=("data.root=$LOVEDA_ROOT" "${two_stage[@]}" source_stage.iters="${REAL_SOURCE_ITERS:-1500}"
              train.iters="${REAL_ITERS:-1500}" train.eval_every=500 train.checkpoint_every=500)
compare() {  # config, out table, overrides…: until the budget (less 20 s to pack) is spent
  local config=$1 table=$2; shift 2
  local t=$(( $(left) - 20 ))
  if [ "$t" -lt 30 ]; then echo "no time left for $config"; return; fi
  timeout --kill-after=5 "$t" python3 experiments/compare_methods.py --config "$config" --seeds 0 1 2 \
    --jobs "$JOBS" --runs-dir "$RUNS" --out "$OUT/$table" "$@" "${EXTRA[@]}" 2>&1 | tee -a "$OUT/compare.log" | grep -v Warning
}
if section compare; then
  compare synthetic methods_synthetic.md "${synthetic[@]}"
  compare loveda_sample methods_cross_sensor.md "${cross_sensor[@]}"
  compare synthetic ablation_synthetic.md --ablation "${synthetic[@]}"
  tar czf "$OUT/runs.tgz" $(find "$RUNS" -name result.json -o -name variant.json -o -name source_model.json) 2>/dev/null
  echo "finished runs: $(find "$RUNS" -name result.json | wc -l)"
fi
echo "$(left) s of the budget left"
