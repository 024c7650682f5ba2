#!/usr/bin/env bash
# The README's test command: a virtual environment with the dev extras (torch pinned to the
# CPU wheel), the pydensecrf2 oracle for the CRF tests, then the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q -c constraints.txt -e ".[dev]"
# pydensecrf2 only builds against Cython 0.29 without build isolation (see issue notes).
python -c "import pydensecrf.densecrf" 2>/dev/null || pip install -q -c constraints.txt --no-build-isolation pydensecrf2==1.1
python -m pytest -q "$@"
