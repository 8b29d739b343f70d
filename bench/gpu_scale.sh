#!/usr/bin/env bash
# Issue 10 on a four-GPU machine, in parts that each fit one device call:
#   bash bench/gpu_scale.sh OUT_DIR MODEL_DIR tests,moe,apply   # gpu tests; EP=4/2/1 MoE; live apply 1P1D -> 2P2D
#   bash bench/gpu_scale.sh OUT_DIR MODEL_DIR disagg        # 1P1D vs 2P2D vs 4 colocated under load
# MODEL_DIR: a folder with config.json + tokenizer (Llama-3-8B shape, run with --dummy-weights).
set -u
out=${1:?usage: gpu_scale.sh OUT_DIR MODEL_DIR PARTS}
model=${2:?usage: gpu_scale.sh OUT_DIR MODEL_DIR PARTS}
parts=${3:-tests,moe,apply,disagg}
mkdir -p "$out"
quiet() { grep -v '^I1\|fork_posix\|SIGTERM handler\|Token authentication' "$@"; }
for part in ${parts//,/ }; do
    echo "== $part $(date +%T)"
    case $part in
    tests)  # the GPU-marked tests (needs MINIINFER_GPU_MODEL, see tests/gpu/test_gpu_cluster.py)
        timeout 240 python3 -m pytest -q -m gpu tests/gpu tests/kernels \
            tests/unit/test_moe.py -p no:cacheprovider >"$out/gpu_tests.txt" 2>&1
        echo "rc=$?"; tail -4 "$out/gpu_tests.txt" ;;
    moe)
        for n in 4 2; do
            timeout 150 python3 bench/moe_ep.py --ranks $n --port $((29560 + n)) --json "$out/moe_ep$n.jsonl" \
                >"$out/moe_ep$n.txt" 2>"$out/moe_ep$n.err"
            echo "rc=$? (EP=$n)"; cat "$out/moe_ep$n.txt"; tail -3 "$out/moe_ep$n.err"
        done ;;
    apply)
        timeout 330 python3 bench/scale_out.py --model "$model" --dummy-weights --rate "${RATE:-8}" \
            --duration "${DURATION:-60}" --apply-at 10 --out "$out/scale_out" >"$out/scale_out.txt" 2>"$out/scale_out.err"
        echo "rc=$?"; cat "$out/scale_out.txt"; quiet "$out/scale_out.err" | tail -8 ;;
    disagg)
        timeout "${DISAGG_S:-520}" python3 bench/disagg.py --model "$model" --dummy-weights \
            --setups 1p1d,2p2d,colocated4 --mix summarize --rates "${RATES:-8,16,24,32}" \
            --num-requests "${NUM_REQUESTS:-160}" --probe-n 3 --slo-ttft-ms 2000 --slo-tpot-ms 10 --out "$out/disagg" >"$out/disagg.txt" 2>"$out/disagg.err"
        echo "rc=$?"; cat "$out/disagg.txt"; quiet "$out/disagg.err" | tail -8 ;;
    *) echo "unknown part $part (tests, moe, apply, disagg)"; exit 2 ;;
    esac
done
echo "== done $(date +%T)"
