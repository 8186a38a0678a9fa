#!/usr/bin/env bash
# The checks CI runs, in order: lint, the import contract (pyproject's [tool.importlinter]),
# then the whole test suite with the model-level tests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/lint-imports
.venv/bin/python -m pytest -q --runslow "$@"
