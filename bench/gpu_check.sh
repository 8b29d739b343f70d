#!/usr/bin/env bash
# The shipped defaults on one GPU, in one device call, most decisive part first: the GEMV's
# kernel and engine tests; the 8B shape's GEMV A/B at one row (per-layer table, then whole
# decode steps on cuBLAS, on the GEMV with the residual adds + norms split between the GEMVs
# around them, and on the GEMV with the norms in their own kernels); then
# bench/gpu_decode.py's whole table. Each part has its own timeout (560 s in all, under the
# device tool's 600), so what finished comes back when the call is cut.
#   bash bench/gpu_check.sh OUT_DIR
set -u
out=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
unset MINIINFER_PDL MINIINFER_FUSE_ROTARY_STORE MINIINFER_WEIGHT_PREFETCH MINIINFER_GEMV
start=$(date +%s)
part() { echo "== [$(( $(date +%s) - start )) s] $*"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
part "pytest -m gpu tests/kernels/test_kernel_gemv.py"
timeout 80 python3 -m pytest -q -m gpu tests/kernels/test_kernel_gemv.py >"$out/kernel_tests.txt" 2>&1
echo "rc=$?"; tail -3 "$out/kernel_tests.txt"
part "pytest -m gpu tests/gpu/test_gpu_engine.py -k gemv"
timeout 100 python3 -m pytest -q -m gpu tests/gpu/test_gpu_engine.py -k gemv >"$out/engine_tests.txt" 2>&1
echo "rc=$?"; tail -3 "$out/engine_tests.txt"
part "bench/gemv.py 8B, 1 row: --engine"
timeout 160 python3 bench/gemv.py --models llama3-8b --rows 1 --engine --batches 1 --rounds 5 \
    >"$out/gemv_8b.txt" 2>"$out/gemv_8b.err"
echo "rc=$?"; tail -16 "$out/gemv_8b.txt"; tail -3 "$out/gemv_8b.err"
part "bench/gpu_decode.py"
GPU_DECODE_JSON="$out/decode.jsonl" timeout 220 python3 bench/gpu_decode.py --time-budget-s 200 \
    >"$out/decode.txt" 2>"$out/decode.err"
echo "rc=$?"; tail -60 "$out/decode.txt"; tail -3 "$out/decode.err"
part end
