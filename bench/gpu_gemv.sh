#!/usr/bin/env bash
# The GEMV kernel (kernels/gemv.py) on one GPU, in one go, most decisive part first: its GPU
# tests; the 8B shape's per-layer table with a config sweep at 1 and 4 rows, then whole
# decode steps on cuBLAS, on the GEMV's defaults and on the swept configs (bench/gemv.py
# --sweep --engine); SmolLM2's whole steps (the GEMV with its norms fused, and apart); the
# engine test. Each part has its own timeout (570 s in all, under the device tool's 600),
# so what finished comes back when the call is cut.
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
timeout 100 python3 -m pytest -q -m gpu tests/kernels/test_kernel_gemv.py >"$out/kernel_tests.txt" 2>&1
echo "rc=$?"; tail -3 "$out/kernel_tests.txt"
part "bench/gemv.py 8B: --sweep --engine"
timeout 290 python3 bench/gemv.py --models llama3-8b --rows 1,4 --sweep --sweep-budget-s 15 \
    --engine --batches 1,4 --rounds 4 >"$out/llama.txt" 2>"$out/llama.err"
echo "rc=$?"; tail -24 "$out/llama.txt"; tail -3 "$out/llama.err"
part "bench/gemv.py SmolLM2: --engine"
timeout 90 python3 bench/gemv.py --no-kernels --engine --models smollm2-135m \
    --batches 1,4 --rounds 4 >"$out/smollm2.txt" 2>"$out/smollm2.err"
echo "rc=$?"; tail -10 "$out/smollm2.txt"; tail -3 "$out/smollm2.err"
part "pytest -m gpu tests/gpu/test_gpu_engine.py -k gemv"
timeout 90 python3 -m pytest -q -m gpu tests/gpu/test_gpu_engine.py -k gemv >"$out/engine_test.txt" 2>&1
echo "rc=$?"; tail -3 "$out/engine_test.txt"
part end
