#!/usr/bin/env bash
# Create .venv and install granalign with its training and test extras.
# torch is pinned so pip takes the local CPU build instead of pulling a multi-GB CUDA wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
