#!/usr/bin/env bash
# Issue 8 on a two-GPU machine, in one go: the KV transfer bench, then disaggregated 1P1D vs
# two colocated replicas under the same Poisson load (Llama-3-8B-shaped dummy weights).
#   bash bench/gpu_pd.sh OUT_DIR MODEL_DIR [extra bench/disagg.py args]
set -u
out=${1:?usage: gpu_pd.sh OUT_DIR MODEL_DIR}
model=${2:?usage: gpu_pd.sh OUT_DIR MODEL_DIR}
shift 2
mkdir -p "$out"
echo "== bench/kv_transfer.py"
timeout 120 python3 bench/kv_transfer.py --iters 8 --batch 2 --json "$out/kv_transfer.jsonl" \
    >"$out/kv_transfer.txt" 2>"$out/kv_transfer.err"
echo "rc=$?"; tail -8 "$out/kv_transfer.txt"; tail -3 "$out/kv_transfer.err"
echo "== bench/disagg.py"
timeout 440 python3 bench/disagg.py --model "$model" --dummy-weights --setups 1p1d,colocated2 \
    --mix summarize --rates 2,4,8,16 --num-requests 48 --slo-ttft-ms 2000 --slo-tpot-ms 20 \
    --out "$out/disagg" "$@" >"$out/disagg.txt" 2>"$out/disagg.err"
echo "rc=$?"; tail -30 "$out/disagg.txt"; grep -v '^I1\|fork_posix' "$out/disagg.err" | tail -15
