#!/usr/bin/env bash
# The first GPU figures (issue 19) in one device call of about 9 minutes. BENCHMARKS.md ("GPU check") says how:
#
#   bash scripts/gpu_check.sh --fetch-wheels     # here, where pip reaches PyPI: the packages the device lacks -> .whl/
#   run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)    # the device tool, then give_back
#
# Steps, each under its own `timeout` (so one hang cannot eat the rest) and cut to the time left of BUDGET seconds:
#   wheels    install .whl/*.whl into WORK/site (the device's own torch / transformers stay)
#   env       nvidia-smi, package versions, what torch sees
#   bench     bench.py at SAM input 1024, batch 4 and 8, sdpa (optimised) and flex, with and without gradient
#             checkpointing: images/s, step time, peak memory, forward peak, MFU; the data pipeline alone
#   estimate  (in the background, on the CPU, from maxbatch on) bench.py --estimate-memory for the same settings
#   maxbatch  the largest batch that fits at 1024 with the default settings (doubling, then bisection)
#   cuda      pytest -m cuda: the CUDA-only tests
#   synth, train, eval, eigenears   150 steps of the full ViT-B (--no-pretrained) at input 512 in bf16 on synthetic
#             ears, then eval.py and eigenears.py on its best.pt at their default batch
#   summary   OUT/gpu_check.json (every figure) and OUT/summary.md (readable), beside OUT/log.txt and OUT/bench.md
#
# Environment: OUT (the device tool sets it; default WORK/out), PYTHON (default python3), GPU_CHECK_BUDGET (seconds,
# default 510), GPU_CHECK_STEPS ("bench maxbatch": only these, for a rerun; with GPU_CHECK_WORK=DIR, an earlier
# run's folder, their results join its), GPU_CHECK_DRY=1 (the same steps on the CPU at tiny sizes, with 4x the
# time: a rehearsal, none of its figures is a GPU figure), GPU_CHECK_SCALE (every timeout x this; dry default 4).
set -u -o pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--fetch-wheels" ]; then  # the device README's command: CPython 3.12 on x86-64, no dependencies
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl lpips==0.1.4
  exit
fi

PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY:-0}
SCALE=${GPU_CHECK_SCALE:-$([ "$DRY" = 1 ] && echo 4 || echo 1)}  # every timeout x this
BUDGET=${GPU_CHECK_BUDGET:-$((510 * SCALE))}
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}  # GPU_CHECK_WORK: an earlier run's, to add steps to it
OUT=${OUT:-$WORK/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 GPU_CHECK_DRY=$DRY
SECONDS=0
MARGIN=$((20 * SCALE))  # seconds kept for the summary

step() {  # step NAME TIMEOUT COMMAND...: under `timeout`, cut to the time left; NAME, exit code, seconds, timeout -> steps.tsv
  local name=$1 cap=$(($2 * SCALE)); shift 2
  if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ " $GPU_CHECK_STEPS " != *" $name "* ]]; then return 0; fi
  local left=$((BUDGET - MARGIN - SECONDS))
  ((left < cap)) && cap=$left
  if ((cap < 5)); then
    printf '%s\t%s\t%s\t%s\n' "$name" -1 0 0 >>"$WORK/steps.tsv"
    echo "== $name: not run, no time left"
    return 0
  fi
  echo "== $name (timeout ${cap} s, at ${SECONDS} s): $*"
  local t0=$SECONDS rc
  timeout -k 10 "$cap" "$@"
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - t0)) "$cap" >>"$WORK/steps.tsv"
  echo "== $name: exit $rc after $((SECONDS - t0)) s"
}

if [ "$DRY" = 1 ]; then
  SIZE=64 BATCHES="1" VARIANTS="optimised" BENCH_STEPS=1 WORKERS=2
  DATA="--n-train 24 --n-val 8" TRAIN="--tiny --no-pretrained --max-steps 6 --log-every 1"
else
  SIZE=1024 BATCHES="4 8" VARIANTS="optimised flex" BENCH_STEPS=8 WORKERS=8
  DATA="--n-train 600 --n-val 64" TRAIN="--no-pretrained --input-size 512 --max-steps 150 --log-every 10"
fi
echo "gpu_check: work $WORK, out $OUT, budget $BUDGET s, dry $DRY, python $PY"

if compgen -G ".whl/*.whl" >/dev/null; then
  step wheels 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" .whl/*.whl && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
step env 45 "$PY" scripts/gpu_check.py env "$WORK"
step vgg 30 "$PY" scripts/gpu_check.py vgg "$WORK"
# shellcheck disable=SC2086  # word splitting of the size lists is wanted
step bench 200 "$PY" bench.py --sizes $SIZE --batch-sizes $BATCHES --variants $VARIANTS --grad-checkpointing \
  --steps $BENCH_STEPS --workers $WORKERS --json "$WORK/bench.json" --markdown "$WORK/bench.md"
# the estimate needs no GPU: on the CPU beside the steps whose timings matter less (its own log, shown at the end)
# shellcheck disable=SC2086
(export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=4; step estimate 300 "$PY" bench.py --estimate-memory \
  --sizes $SIZE --batch-sizes $BATCHES --json "$WORK/estimate.json") >"$WORK/estimate.log" 2>&1 &
ESTIMATE=$!
step maxbatch 90 "$PY" scripts/gpu_check.py maxbatch "$WORK"
step cuda 120 "$PY" -m pytest -m cuda -n 0 -p no:cacheprovider -rA --continue-on-collection-errors \
  --junitxml="$WORK/cuda_tests.xml"
# shellcheck disable=SC2086
step synth 30 "$PY" synth.py --out "$WORK/data" $DATA --seed 0
# shellcheck disable=SC2086
step train 120 "$PY" train.py $TRAIN --data-dir "$WORK/data" --epochs 1 --warmup-steps 15 --workers $WORKERS \
  --vgg-weights "$WORK/vgg16_random.pth" --ckpt-dir "$WORK/run/checkpoints" --log-dir "$WORK/run/logs"
step eval 45 "$PY" eval.py "$WORK/run/checkpoints/best.pt" --out "$WORK/eval"
step eigenears 45 "$PY" eigenears.py --ckpt "$WORK/run/checkpoints/best.pt" --out "$WORK/eigenears"
wait "$ESTIMATE"  # the estimate (under its own timeout); a bare `wait` would also wait for tee, forever
echo "== estimate log"
cat "$WORK/estimate.log" 2>/dev/null
cp "$WORK/bench.md" "$OUT/bench.md" 2>/dev/null
timeout -k 5 $((MARGIN - 2)) "$PY" scripts/gpu_check.py summary "$WORK" "$OUT"
echo "gpu_check: ${SECONDS} s in all; results in $OUT"
sleep 1  # tee's last lines into OUT/log.txt
