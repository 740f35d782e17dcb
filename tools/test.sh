#!/usr/bin/env bash
# Sets up .venv from the project's own files (if needed), then runs ruff and the default pytest
# run on each Keras backend: TensorFlow (every test), then JAX in float64-capable mode (the tests
# marked for it; see tests/conftest.py). Prints how long each part took.
# Each session runs on two pytest-xdist workers, one test file per worker at a time (most of a
# test's time is single-threaded tracing, so two workers use the two cores); PYTEST_WORKERS=0
# runs them in one process.
# Usage: bash tools/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SECONDS=0
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[cpu,jax,test]"
echo "== environment ready (${SECONDS} s)"
.venv/bin/ruff check .
.venv/bin/ruff format --check .

run_pytest() {  # $1: backend; the rest: pytest args. Exit code 5 (nothing collected) is success.
  local backend=$1 start=$SECONDS rc workers=()
  shift
  if [ "${PYTEST_WORKERS:-2}" != 0 ]; then
    workers=(-n "${PYTEST_WORKERS:-2}" --dist loadfile)
  fi
  workers+=(--durations=15)  # the slowest tests, to keep the run short
  set +e
  if [ "$backend" = jax ]; then
    KERAS_BACKEND=jax JAX_ENABLE_X64=1 .venv/bin/python -m pytest -m "not slow" "${workers[@]}" "$@"
  else
    KERAS_BACKEND=tensorflow .venv/bin/python -m pytest -m "not slow" "${workers[@]}" "$@"
  fi
  rc=$?
  set -e
  if [ "$rc" -eq 5 ]; then
    echo "pytest ($backend) collected no tests (exit 5): treated as success"
    rc=0
  fi
  echo "== pytest on $backend: exit $rc ($((SECONDS - start)) s)"
  return "$rc"
}

status=0
run_pytest tensorflow "$@" || status=1
run_pytest jax "$@" || status=1
echo "== all done (${SECONDS} s)"
exit "$status"
