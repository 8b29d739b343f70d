#!/usr/bin/env bash
# The GEMV kernel (kernels/gemv.py) on one GPU, in one go, most decisive part first: its GPU
# tests, whole decode steps with it against cuBLAS (bench/gemv.py --engine, 8B then SmolLM2
# shape), the engine test, then the per-layer table with a config sweep at 1 and 4 rows.
# About 7 minutes on an H100 with an empty Triton cache; each part has its own timeout, so
# what finished comes back when the call is cut.
#   bash bench/gpu_gemv.sh OUT_DIR
set -u
out=${1:?usage: gpu_gemv.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=$PWD
unset MINIINFER_PDL MINIINFER_FUSE_ROTARY_STORE MINIINFER_WEIGHT_PREFETCH MINIINFER_GEMV
start=$(date +%s)
part() { echo "== [$(( $(date +%s) - start )) s] $*"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
part "pytest -m gpu tests/kernels/test_kernel_gemv.py"
timeout 90 python3 -m pytest -q -m gpu tests/kernels/test_kernel_gemv.py >"$out/kernel_tests.txt" 2>&1
echo "rc=$?"; tail -3 "$out/kernel_tests.txt"
part "bench/gemv.py --engine"
timeout 200 python3 bench/gemv.py --no-kernels --engine --models llama3-8b,smollm2-135m \
    --batches 1,4 --rounds 4 >"$out/engine.txt" 2>"$out/engine.err"
echo "rc=$?"; tail -14 "$out/engine.txt"; tail -3 "$out/engine.err"
part "pytest -m gpu tests/gpu/test_gpu_engine.py -k gemv"
timeout 90 python3 -m pytest -q -m gpu tests/gpu/test_gpu_engine.py -k gemv >"$out/engine_test.txt" 2>&1
echo "rc=$?"; tail -3 "$out/engine_test.txt"
part "bench/gemv.py --sweep"
timeout 150 python3 bench/gemv.py --rows 1,4 --sweep >"$out/kernels.txt" 2>"$out/kernels.err"
echo "rc=$?"; tail -24 "$out/kernels.txt"; tail -3 "$out/kernels.err"
part end
