#!/usr/bin/env bash
# The GPU checks of the step-cost issue in one command, from the repository root, on a
# machine with PyTorch, torchvision and a CUDA GPU (Avalanche is not needed):
#
#   bash benchmarks/gpu_check.sh results/gpu
#
# 1. the CUDA tests (tests/test_cuda.py: CUDA and CPU shards beside a GPU model, the
#    worker's stream, several ranks sharing the GPU over cuda:gloo, NCCL with one rank);
# 2. the gpu_step benchmark part (ResNet-18 and ResNet-50 training steps against
#    incremental training, CUDA and CPU shards, sync / async / auto, and a profiler trace
#    of the host waits on the training thread).
# Each writes its log into the output folder (with results.json and results.md); a test
# that fails does not stop the benchmark. PYTHON picks the interpreter (default python3).
set -uo pipefail
out="${1:-results/gpu}"
py="${PYTHON:-python3}"
mkdir -p "$out"
"$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/test_cuda.log"
tests=${PIPESTATUS[0]}
"$py" -m benchmarks.run --device cuda --parts gpu_step --out "$out" 2>&1 | tee "$out/gpu_step.log"
bench=${PIPESTATUS[0]}
echo "tests/test_cuda.py exit status $tests; gpu_step exit status $bench"
exit $(( tests != 0 || bench != 0 ))
