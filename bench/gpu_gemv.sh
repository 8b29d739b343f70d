#!/usr/bin/env bash
# The GEMV (kernels/gemv.py) on one GPU, in one device call, most decisive part first. Each
# part has its own timeout (550 s in all for check, 580 for tune: under the device tool's
# 600), so what finished comes back when the call is cut; the end prints each part's exit
# status and test summary. One output file a part (a device call returns at most 8).
#   bash bench/gpu_gemv.sh OUT_DIR [check|tune]
# check (the default): the shipped defaults. The GEMV's kernel and engine tests; the 8B
#   shape's per-layer table at one row, then whole decode steps on cuBLAS and on the GEMV
#   with the residual adds + norms in their own kernels or split between the GEMVs around
#   them (gate_up's registers capped, or the scale after the loops), or with the early
#   weight prefetch (one or two K steps; one plus the o weight ahead of attention's reduce),
#   each set's kernels profiled after the timings (bench/gemv.py --engine --profile); then
#   bench/gpu_decode.py's whole table.
# tune: the kernel tests; the 8B shape's per-layer table with a config sweep at 1 and 4
#   rows, then whole decode steps on cuBLAS, the GEMV's defaults and the swept configs;
#   SmolLM2's whole steps (the norms fused and apart); the engine test.
set -u
out=${1:?usage: gpu_gemv.sh OUT_DIR [check|tune]}
mode=${2:-check}
case $mode in check | tune) ;; *) echo "unknown mode $mode (check | tune)"; exit 2 ;; esac
source bench/gpu_parts.sh "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
run kernel_tests 120 python3 -m pytest -q -rf -m gpu \
    tests/kernels/test_kernel_prefetch.py::test_decode_attention_with_ahead_gives_the_same_bits \
    tests/kernels/test_kernel_gemv.py
case $mode in
check)
    run engine_tests 100 python3 -m pytest -q -rf -m gpu tests/gpu/test_gpu_engine.py -k gemv
    TAIL=20 run gemv_8b 160 python3 bench/gemv.py --models llama3-8b --rows 1 --engine --batches 1 \
        --rounds 5 --profile 10
    GPU_DECODE_JSON="$out/decode.jsonl" TAIL=60 run decode 170 python3 bench/gpu_decode.py \
        --time-budget-s 150 ;;
tune)
    TAIL=24 run llama 280 python3 bench/gemv.py --models llama3-8b --rows 1,4 --sweep \
        --sweep-budget-s 15 --engine --batches 1,4 --rounds 4
    TAIL=10 run smollm2 90 python3 bench/gemv.py --no-kernels --engine --models smollm2-135m \
        --batches 1,4 --rounds 4
    run engine_tests 90 python3 -m pytest -q -rf -m gpu tests/gpu/test_gpu_engine.py -k gemv ;;
esac
recap_parts
