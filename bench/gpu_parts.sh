# Sourced by the bench/gpu_*.sh scripts: run a device call's parts, each with its own
# timeout and output file, and recap them at the end.
#   source bench/gpu_parts.sh OUT_DIR; run NAME TIMEOUT_S CMD...; ...; recap_parts
# Each part writes OUT_DIR/NAME.txt (a device call returns at most 8 files), prints its exit
# status and the last TAIL (default 4) lines, and adds its pytest summary to the recap.
out=${1:?usage: source bench/gpu_parts.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
unset MINIINFER_PDL MINIINFER_FUSE_ROTARY_STORE MINIINFER_WEIGHT_PREFETCH MINIINFER_GEMV
start=$(date +%s)
part() { echo "== [$(( $(date +%s) - start )) s] $*"; }
recap=""
run() {  # run NAME TIMEOUT_S CMD...
    local name=$1 limit=$2 rc
    shift 2
    part "$name: $*"
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    rc=$?
    echo "rc=$rc"; tail -"${TAIL:-4}" "$out/$name.txt"
    recap+="$name: rc=$rc $(grep -E '^[0-9]+ (passed|failed)|^(FAILED|ERROR) ' "$out/$name.txt" | tr '\n' ';')"$'\n'
}
recap_parts() {  # each part's status and test summary, last (what a cut call still shows)
    part end
    printf '%s' "$recap"
}
