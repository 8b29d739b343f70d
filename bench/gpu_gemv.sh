#!/usr/bin/env bash
# The GEMV (kernels/gemv.py) on one GPU, in one device call, most decisive part first. Each
# part has its own timeout (570 s in all, under the device tool's 600), so what finished
# comes back when the call is cut.
#   bash bench/gpu_gemv.sh OUT_DIR [check|tune]
# check (the default): the shipped defaults. The GEMV's kernel and engine tests; the 8B
#   shape's per-layer table at one row, then whole decode steps on cuBLAS and on the GEMV
#   with the residual adds + norms in their own kernels or split between the GEMVs around
#   them (bench/gemv.py --engine); then bench/gpu_decode.py's whole table.
# tune: the kernel tests; the 8B shape's per-layer table with a config sweep at 1 and 4
#   rows, then whole decode steps on cuBLAS, the GEMV's defaults and the swept configs;
#   SmolLM2's whole steps (the norms fused and apart); the engine test.
set -u
out=${1:?usage: gpu_gemv.sh OUT_DIR [check|tune]}
mode=${2:-check}
case $mode in check | tune) ;; *) echo "unknown mode $mode (check | tune)"; exit 2 ;; esac
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
unset MINIINFER_PDL MINIINFER_FUSE_ROTARY_STORE MINIINFER_WEIGHT_PREFETCH MINIINFER_GEMV
start=$(date +%s)
part() { echo "== [$(( $(date +%s) - start )) s] $*"; }
run() {  # run NAME TIMEOUT_S CMD...: stdout to OUT/NAME.txt, stderr to OUT/NAME.err
    local name=$1 limit=$2
    shift 2
    part "$name: $*"
    timeout "$limit" "$@" >"$out/$name.txt" 2>"$out/$name.err"
    echo "rc=$?"; tail -"${TAIL:-4}" "$out/$name.txt"; tail -3 "$out/$name.err"
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
run kernel_tests 80 python3 -m pytest -q -m gpu tests/kernels/test_kernel_gemv.py
case $mode in
check)
    run engine_tests 100 python3 -m pytest -q -m gpu tests/gpu/test_gpu_engine.py -k gemv
    TAIL=16 run gemv_8b 160 python3 bench/gemv.py --models llama3-8b --rows 1 --engine --batches 1 \
        --rounds 5
    GPU_DECODE_JSON="$out/decode.jsonl" TAIL=60 run decode 220 python3 bench/gpu_decode.py \
        --time-budget-s 200 ;;
tune)
    TAIL=24 run llama 290 python3 bench/gemv.py --models llama3-8b --rows 1,4 --sweep \
        --sweep-budget-s 15 --engine --batches 1,4 --rounds 4
    TAIL=10 run smollm2 90 python3 bench/gemv.py --no-kernels --engine --models smollm2-135m \
        --batches 1,4 --rounds 4
    run engine_tests 90 python3 -m pytest -q -m gpu tests/gpu/test_gpu_engine.py -k gemv ;;
esac
part end
