#!/usr/bin/env bash
# Builds every Bazel target and runs a fast subset of the tests through `bazel test`, so that
# BUILD, tests/BUILD and WORKSPACE cannot rot. Needs the project's .venv (tools/test.sh makes it)
# and Bazel: if `bazel` is missing and this runs as root with apt-get, it installs Debian's
# bazel-bootstrap (Bazel 4.2; the build itself fetches nothing). Prints how long each part took.
# Usage: bash tools/bazel_check.sh [bazel test targets]   (default: the fast subset below)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS=0
if ! command -v bazel >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends bazel-bootstrap >/dev/null \
      || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends bazel-bootstrap >/dev/null; }
  else
    echo "bazel_check: no bazel on PATH; install it (Debian: apt-get install bazel-bootstrap)" >&2
    exit 1
  fi
fi
echo "== Bazel ready: $(command -v bazel) (${SECONDS} s)"
if [ ! -x .venv/bin/python ]; then
  echo "bazel_check: .venv is missing; run bash tools/test.sh first" >&2
  exit 1
fi
export PATH="$PWD/.venv/bin:$PATH"
# Local execution (no sandbox: containers often lack user namespaces); the test environment
# keeps PATH so that the tests run with the .venv interpreter.
FLAGS=(--spawn_strategy=local --test_env=PATH --test_env=HOME --test_output=errors
  --noshow_progress --curses=no --color=no)
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  TARGETS=(//tests:test_kronecker //tests:test_registry)
fi
start=$SECONDS
status=0
bazel build "${FLAGS[@]}" //... || status=1
echo "== bazel build //...: exit $status ($((SECONDS - start)) s)"
start=$SECONDS
rc=0
bazel test "${FLAGS[@]}" "${TARGETS[@]}" || rc=$?
echo "== bazel test ${TARGETS[*]}: exit $rc ($((SECONDS - start)) s)"
bazel shutdown >/dev/null 2>&1 || true
[ "$rc" = 0 ] || status=1
echo "== bazel check done (${SECONDS} s)"
exit "$status"
