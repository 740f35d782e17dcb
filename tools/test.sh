#!/usr/bin/env bash
# Sets up .venv from the project's own files (if needed), then runs ruff and the default pytest
# run on each Keras backend: TensorFlow (every test), then JAX in float64-capable mode (the tests
# marked for it; see tests/conftest.py). Prints how long each part took.
# Each session runs on two pytest-xdist workers, one test file per worker at a time (most of a
# test's time is single-threaded tracing, so two workers use the two cores); PYTEST_WORKERS=0
# runs them in one process.
# Usage: bash tools/test.sh [extra pytest args]
# A run that collects no test fails (pytest's exit code 5), except that with a selection among
# the arguments (-k, -m, --deselect, --ignore*, --lf, or a test path) one of the two backends
# may select nothing: most tests run on one backend only.
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

# Whether the arguments select tests: -k/-m (also -kEXPR, -k=EXPR), --deselect, --ignore,
# --ignore-glob, --lf/--last-failed, or an argument naming an existing path (tests/x.py,
# tests/x.py::test_y). Not -q, -x, -n 4, -p no:cacheprovider, -c setup.cfg, --rootdir . and
# the like: the value of an option that takes one is skipped.
selects_tests() {
  local arg skip=0
  for arg in "$@"; do
    if [ "$skip" = 1 ]; then
      skip=0
      continue
    fi
    case "$arg" in
      -k* | -m* | --deselect* | --ignore* | --lf | --last-failed) return 0 ;;
      -c | -p | -n | -o | -W | --rootdir | --basetemp | --confcutdir | --junitxml | --junit-xml | \
        --durations | --maxfail | --tb | --dist | --log-file | --import-mode | --capture | \
        --override-ini | --pythonwarnings | --maxprocesses | --cov | --cov-report) skip=1 ;;
      -*) ;;
      *) [ -e "${arg%%::*}" ] && return 0 ;;
    esac
  done
  return 1
}

empty=0  # backends that collected no test
run_pytest() {  # $1: backend; the rest: pytest args. Exit code 5: see above.
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
    empty=$((empty + 1))
    if selects_tests "$@"; then
      echo "pytest ($backend) collected no tests (exit 5): the selection holds none on $backend"
      rc=0
    else
      echo "pytest ($backend) collected no tests (exit 5) in a run without a selection: failure"
    fi
  fi
  echo "== pytest on $backend: exit $rc ($((SECONDS - start)) s)"
  return "$rc"
}

status=0
run_pytest tensorflow "$@" || status=1
run_pytest jax "$@" || status=1
if [ "$empty" -eq 2 ]; then
  echo "== no test collected on either backend: failure"
  status=1
fi
echo "== all done (${SECONDS} s)"
exit "$status"
