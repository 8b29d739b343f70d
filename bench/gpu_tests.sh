#!/usr/bin/env bash
# The one-GPU test suite (`pytest -m gpu`) in one device call, in parts with their own
# timeouts (550 s in all, under the device tool's 600), the files that have gone longest
# without a GPU run first. What finished comes back when the call is cut; the end prints each
# part's exit status and test summary. The multi-GPU cluster files need two or more GPUs and
# are left to bench/gpu_pd.sh and bench/gpu_scale.sh.
#   bash bench/gpu_tests.sh OUT_DIR
set -u
out=${1:?usage: gpu_tests.sh OUT_DIR}
source bench/gpu_parts.sh "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
k=tests/kernels
gpu_pytest=(python3 -m pytest -q -rf -m gpu)  # timeout runs programs, not shell functions
run small_kernels 100 "${gpu_pytest[@]}" $k/test_kernel_rmsnorm.py $k/test_kernel_rotary.py \
    $k/test_kernel_rotary_store_attention.py $k/test_spec_verify.py $k/test_kernel_activation.py \
    $k/test_kernel_kv_store.py $k/test_kernel_ops.py
run engine_spec 200 "${gpu_pytest[@]}" tests/gpu/test_gpu_engine.py tests/gpu/test_gpu_spec.py
run gemv_prefetch_graphs_moe 120 "${gpu_pytest[@]}" $k/test_kernel_gemv.py $k/test_kernel_prefetch.py \
    $k/test_kernel_cuda_graph.py $k/test_kernel_moe.py
run attention 130 "${gpu_pytest[@]}" $k/test_kernel_decode_attention.py $k/test_kernel_prefill_attention.py
recap_parts
