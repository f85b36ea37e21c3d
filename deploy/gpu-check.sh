#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one short script for a lent GPU machine: the exactness
# tests on CUDA, then the verification cost grid. It uses the machine's own python3 with
# PyTorch and transformers (no install: such machines reach no package index) and the
# project's sources on PYTHONPATH; msgspec, if missing there, must be carried as a wheel.
# Results go to $OUT (or ./gpu-check).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"; mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD/libs:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.cuda.get_device_name())"
"$py" -m pytest -q -p no:cacheprovider -m cuda tests/integration/test_equivalence.py 2>&1 | tee "$out/cuda-tests.txt"
"$py" -m specedge.engine.bench_verify --device cuda --batch-sizes 1,4,16,64 --nodes 1,32,64,128 \
    --json "$out/verify-grid.json" | tee "$out/verify-grid.md"
