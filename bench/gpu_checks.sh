#!/usr/bin/env bash
# Every GPU check of issues 16 and 17 in one run on a lent CUDA machine (9.5 minutes at most; each step has
# its own timeout, so a stuck one costs only its share). Prepare here, once per session:
#
#     python bench/llm_scale.py --save-tokenizer .devrun/tokenizer     # .devrun/ is git-ignored
#
# then run it with the device tool: command "bash bench/gpu_checks.sh", carry [".devrun"], timeout_s 590.
# What comes back under $OUT: device.txt, pytest.log, gpu_sparse.log, llm_scale.log and the two benchmarks'
# results (bench/results/gpu_sparse.* and llm_scale.*, the latter with the GPU rows added to the CPU ones);
# copy those into bench/results and commit them.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-checks}
mkdir -p "$OUT"
{ nvidia-smi -L; python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"; } 2>&1 | tee "$OUT/device.txt"
# 1. the tests that need a GPU: streaming on CUDA against the CPU; the real 2:4 kernels
timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_stream.py tests/test_semi_structured.py \
    2>&1 | tee "$OUT/pytest.log"
# 2. F.linear 2:4 against dense at 1 to 16384 tokens; whole models dense, blindly swapped and semi_structured_
timeout 190 python3 bench/gpu_sparse.py --device cuda --time-limit 160 2>&1 | tee "$OUT/gpu_sparse.log"
# 3. streaming on the GPU: a tiny LLaMA, then 1.1B shape, Wanda 50% and SparseGPT 2:4
timeout 280 python3 bench/llm_scale.py --shapes tiny,1.1b --methods wanda,sparsegpt24 --tools secateurs-stream \
    --device cuda --tokenizer .devrun/tokenizer --workdir /tmp/llm 2>&1 | tee "$OUT/llm_scale.log"
cp bench/results/gpu_sparse.md bench/results/gpu_sparse.json bench/results/llm_scale.md \
    bench/results/llm_scale.json "$OUT/" 2>/dev/null
exit 0
