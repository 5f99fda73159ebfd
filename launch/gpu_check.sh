#!/usr/bin/env bash
# The decoder's GPU checks, on a machine with one CUDA device, from the repository root:
#   bash launch/gpu_check.sh [OUT_DIR]
# 1. the CUDA-graph step and the scale bench's machinery at a toy shape (fast; fails early if capture breaks);
# 2. the scale check: an 8B-shaped Llama (random weights, bf16), the llama8b recipe's drafter shape,
#    CUDA graphs, bs 1, 4, 8, tau 3, 4, 5, the verify forward over 1..64 packed tokens (README "On a GPU");
# 3. bs 1 with a drafter half as wide (exit_dim = H), and bs 1 without CUDA graphs (what the graphs buy);
# 4. every other CUDA test (bf16 losslessness, torch.compile reduce-overhead, sampling on CUDA).
set -uo pipefail
out=${1:-outputs/gpu_check}
mkdir -p "$out"
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '|', torch.cuda.get_device_name())"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "whole_step or step_bench" -o addopts=-ra
timeout 220 python3 -m eval.step_bench --shape llama8b --device cuda --dtype bfloat16 --batch-sizes 1,4,8 \
    --taus 3,4,5 --packed-sweep 1,8,16,32,64 --out "$out/step_bench_llama8b.json"
timeout 80 python3 -m eval.step_bench --shape llama8b --device cuda --dtype bfloat16 --exit-dim 4096 --batch-sizes 1 \
    --taus 3,4,5 --out "$out/step_bench_llama8b_exit4096.json"
timeout 80 python3 -m eval.step_bench --shape llama8b --device cuda --dtype bfloat16 --graphs off --batch-sizes 1 \
    --taus 4 --repeats 2 --out "$out/step_bench_llama8b_eager.json"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "not whole_step and not step_bench" -o addopts="-ra --durations=5"
