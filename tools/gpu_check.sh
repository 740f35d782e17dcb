#!/usr/bin/env bash
# The GPU check of keras-tnt, for a machine with an NVIDIA GPU and JAX (with CUDA), and possibly
# no TensorFlow or Keras. Installs nothing from the network. Writes one Markdown report.
#
#   bash tools/gpu_check.sh WHEELS_DIR [OUT_DIR]      (OUT_DIR default: gpu_check_out)
#
# WHEELS_DIR holds Keras and its small pure-Python (or manylinux) dependencies, downloaded on a
# machine with network access for the GPU machine's Python (here 3.12, x86-64):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d wheels \
#     keras==3.15.1 absl-py namex optree rich markdown-it-py mdurl pygments h5py packaging \
#     pytest pluggy iniconfig scikit-learn joblib threadpoolctl
#
# (numpy, scipy and ml_dtypes come with JAX.) They are installed with --no-deps into
# OUT_DIR/site, never into the system. Then the script:
#   1. runs the JAX test subset (the tests marked for JAX) on the GPU, in float64 mode;
#   2. times the MNIST autoencoder (batch 1000) and ResNet-32 (batch 128) steps for TNT, Adam and
#      SGD-m under jax.jit, in float32 and in mixed_bfloat16 (benchmarks/step_time.py);
#   3. with two GPUs or more, the MNIST autoencoder on two of them (DataParallel): TNT and KFAC
#      with the preconditioner work split and not split, against Adam;
#   4. where TensorFlow with a GPU is installed, the same as 2. on the TensorFlow backend;
#   5. writes OUT_DIR/gpu_check.md (and the raw JSON and logs beside it).
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=${1:?usage: bash tools/gpu_check.sh WHEELS_DIR [OUT_DIR]}
OUT=${2:-gpu_check_out}
PY=${PYTHON:-python3}
ROUNDS=${ROUNDS:-2}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPORT="$OUT/gpu_check.md"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$OUT/site" "$WHEELS"/*.whl || { echo "installing the wheels failed" >&2; exit 2; }
export PYTHONPATH="$OUT/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  echo "# keras-tnt GPU check"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ); commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'nvidia-smi not found')"
  echo "- $("$PY" -c 'import jax, keras, sys; print(f"Python {sys.version.split()[0]}, JAX {jax.__version__} on {jax.devices()}, Keras {keras.__version__}")' 2>&1 | tail -1)"
  echo
} > "$REPORT"

section() { echo; echo "## $1"; echo; } >> "$REPORT"

section "JAX test subset on the GPU (KERAS_BACKEND=jax JAX_ENABLE_X64=1)"
# tests/test_golden.py appends its measured error to KERAS_TNT_GOLDEN_REPORT (pytest captures
# what a passing test prints).
GOLDEN_REPORT="$OUT/golden_replay.txt"
rm -f "$GOLDEN_REPORT"
KERAS_TNT_GOLDEN_REPORT="$GOLDEN_REPORT" KERAS_BACKEND=jax JAX_ENABLE_X64=1 "$PY" -m pytest -q \
  -m "not slow" -p no:cacheprovider \
  tests/test_kronecker.py tests/test_tnt_optimizer.py tests/test_shampoo.py tests/test_golden.py \
  tests/test_backends.py > "$OUT/pytest_jax.log" 2>&1
echo "exit code $?: \`$(tail -1 "$OUT/pytest_jax.log")\` (full log: pytest_jax.log)" >> "$REPORT"
{
  if [ -s "$GOLDEN_REPORT" ]; then
    cat "$GOLDEN_REPORT"
  else
    echo "golden replay: no measurement (tests/test_golden.py did not run)"
  fi
  grep -E "^FAILED|^ERROR" "$OUT/pytest_jax.log"
} | sed 's/^/    /' >> "$REPORT"

bench() {  # $1 backend, $2 dtype policy
  local name="$1-$2"
  KERAS_BACKEND=$1 "$PY" -m benchmarks.step_time --problems=autoencoder,resnet32 \
    --rounds="$ROUNDS" --jit_compile --extra_baselines --dtype_policy="$2" \
    --output="$OUT/step_time_$name.json" > "$OUT/step_time_$name.log" 2>&1
  local rc=$?
  section "Step time, $1 backend, jit, $2 (benchmarks/step_time.py, exit $rc)"
  { echo '```'; grep -v "^WARNING\|^I0000\|^W0000" "$OUT/step_time_$name.log" | tail -40; echo '```'; } >> "$REPORT"
}

bench jax float32
bench jax mixed_bfloat16
# Several GPUs: the preconditioner work split across them (DataParallel over the first two;
# split against not split, against Adam on the same two devices).
if [ "$("$PY" -c 'import jax; print(len(jax.devices("gpu")))' 2>/dev/null || echo 0)" -gt 1 ]; then
  KERAS_BACKEND=jax "$PY" -m benchmarks.step_time --problems=autoencoder_2replicas \
    --rounds="$ROUNDS" --jit_compile --output="$OUT/step_time_2gpus.json" \
    > "$OUT/step_time_2gpus.log" 2>&1
  rc=$?
  section "Two GPUs: the preconditioner work split (benchmarks/step_time.py, exit $rc)"
  { echo '```'; grep -v "^WARNING\|^I0000\|^W0000" "$OUT/step_time_2gpus.log" | tail -20; echo '```'; } >> "$REPORT"
else
  section "Two GPUs"
  echo "Not run: fewer than two GPUs on this machine." >> "$REPORT"
fi
if "$PY" -c 'import tensorflow as tf, sys; sys.exit(0 if tf.config.list_physical_devices("GPU") else 1)' 2>/dev/null; then
  bench tensorflow float32
  bench tensorflow mixed_bfloat16
else
  section "TensorFlow backend"
  echo "Not run: no TensorFlow with a visible GPU on this machine." >> "$REPORT"
fi
echo "report: $REPORT"
cat "$REPORT"
