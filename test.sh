#!/usr/bin/env bash
# The test command (README): notebooks clean, library in sync with them, every notebook run
# once, then pytest. Exits non-zero when anything fails, pytest's "no tests ran" included.
#   ./test.sh                      # CPU: skips cells flagged notest / slow / gpu
#   NBDEV_FLAGS="gpu slow" ./test.sh   # on a GPU machine: also runs the #| gpu and #| slow cells
# Extra arguments go to pytest (e.g. ./test.sh -k config).
set -euo pipefail
cd "$(dirname "$0")"

echo "== nbdev-clean, nbdev-export: notebooks clean and library in sync"
nbdev-clean
nbdev-export
if ! git diff --exit-code --stat -- nbs sce_mae pyproject.toml; then
  echo "FAILED: nbdev-clean/nbdev-export changed the files above: clean the notebooks, export, and commit (or stage) the result" >&2
  exit 1
fi
untracked=$(git ls-files --others --exclude-standard -- nbs sce_mae)
if [ -n "$untracked" ]; then
  echo "FAILED: untracked notebooks or modules (add them to git):" >&2; echo "$untracked" >&2; exit 1
fi

echo "== nbdev-test: every notebook, top to bottom"
# notebooks run NBDEV_WORKERS at a time: one math thread each, so they do not fight over the cores
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" nbdev-test --n-workers "${NBDEV_WORKERS:-2}" --timing ${NBDEV_FLAGS:+--flags "$NBDEV_FLAGS"}

echo "== pytest"
python -m pytest -q -rs "$@"
