#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one short script for a lent GPU machine (about 10
# minutes on one H100/H200): the exactness tests on CUDA (bit-exact logits of the exact
# runner in fp32 and bf16, and every mode's output), then the verifier engine's benchmark
# with a Qwen3-14B-shaped target and a Qwen3-0.6B-shaped draft (random weights in bf16,
# nothing downloaded), the exact and flex backends side by side. It uses the
# machine's own python3 with PyTorch and transformers and the project's sources on
# PYTHONPATH. Results (JSON and markdown tables) go to $OUT (or ./gpu-check).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"; mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD/libs:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.cuda.get_device_name())"
"$py" -m pytest -q -p no:cacheprovider -m cuda tests/integration/test_exact_runner.py \
    tests/integration/test_equivalence.py 2>&1 | tee "$out/cuda-tests.txt"
"$py" -m specedge_bench.verify --device cuda --target qwen3-14b --batch 1,8,64 --nodes 8,33 \
    --context 2048,4096 --repeats 5 --backends exact,flex --json "$out/verify-qwen3-14b.json" --markdown "$out/verify-qwen3-14b.md"
"$py" -m specedge_bench.verify --device cuda --target qwen3-0.6b --batch 1,8 --nodes 8,33 \
    --context 2048 --repeats 5 --backends exact,flex --json "$out/draft-qwen3-0.6b.json" --markdown "$out/draft-qwen3-0.6b.md"
