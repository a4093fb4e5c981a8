#!/usr/bin/env bash
# The GPU verification steps of docs/CONTRIBUTING.md ("Open work"), run from the repository root on
# a machine with one CUDA GPU, each with its log under OUT and a time limit that leaves room for the
# steps after it:
#
#   OUT=gpu-out LIMIT=570 bash tools/gpu_steps.sh conformance     # about 4.5 minutes on an H100
#   OUT=gpu-out LIMIT=570 bash tools/gpu_steps.sh rest            # about 6 minutes: a call of its own
#   OUT=gpu-out bash tools/gpu_steps.sh alone
#   OUT=gpu-out bash tools/gpu_steps.sh tune heldout          # tune --quick, then the held-out bench on it
#   OUT=gpu-out bash tools/gpu_steps.sh resume heldout        # a tune that ran out of time, continued
#   STATE_FROM=prev-out OUT=gpu-out bash tools/gpu_steps.sh resume   # ... on a fresh machine
#   OUT=gpu-out bash tools/gpu_steps.sh bench                  # the tuned grid, dispatcher beside every provider
#   OUT=gpu-out bash tools/gpu_steps.sh serving variants
#   OUT=gpu-out bash tools/gpu_steps.sh demo gluon backward    # the demo; the Gluon forward's and backward's configs
#   OUT=gpu-out bash tools/gpu_steps.sh window                 # the sliding-window bars alone
#
# LIMIT: seconds for the whole call (default 570: a 10-minute session leaves room for the install).
# STATE: where the tune keeps its profile and state between calls (default /tmp/flashdispatch-tune);
# the held-out bench uses the profile there when one exists, else the shipped one. STATE_FROM: a
# folder holding an earlier call's <key>.yaml and <key>.state.json (its OUT, carried to this
# machine): copied into STATE first, so that `resume` continues a tune on a fresh machine. The pytest steps
# print every test's outcome to their log (-v -rfE), so a step stopped by its limit still names its
# failures.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}
LIMIT=${LIMIT:-570}
STATE=${STATE:-/tmp/flashdispatch-tune}
T0=$(date +%s)
mkdir -p "$OUT" "$STATE"

left() { echo $((LIMIT - ($(date +%s) - T0))); }
at() { echo "t=$(($(date +%s) - T0))s"; }
# limit N: N seconds, or what is left of LIMIT less 5, whichever is smaller
limit() { local l; l=$(($(left) - 5)); echo $(($1 < l ? $1 : l)); }

python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/pip.log" 2>&1 || tail -5 "$OUT/pip.log"
KEY=$(python3 -c "import flashdispatch.device as d; dev = d.current_device(); print(dev.profile_key if dev.kind != 'cpu' else None)") || {
    echo "gpu_steps: flashdispatch does not import with this python3 (see $OUT/pip.log)" >&2; exit 2; }
[ "$KEY" != None ] || { echo "gpu_steps: no GPU with a profile key on this machine (found: $KEY)" >&2; exit 2; }
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
echo "profile key: $KEY"
if [ -n "${STATE_FROM:-}" ]; then
    cp "$STATE_FROM/$KEY.yaml" "$STATE_FROM/$KEY.state.json" "$STATE/" 2>/dev/null \
        && echo "tune state from $STATE_FROM" || echo "gpu_steps: no $KEY.yaml / $KEY.state.json in $STATE_FROM" >&2
fi
PYTEST=(python3 -m pytest -p no:cacheprovider -rfE --durations=15)

# run NAME SECONDS LINES CMD...: CMD within SECONDS (or what is left of LIMIT), its output in
# OUT/NAME.log; then its exit code, the failures pytest named, and the log's last LINES lines
run() {
    local name=$1 secs=$2 lines=$3
    shift 3
    timeout "$(limit "$secs")" "$@" >"$OUT/$name.log" 2>&1
    echo "$name rc=$? $(at)"
    grep -E "^FAILED|^ERROR" "$OUT/$name.log" | head -20
    tail -"$lines" "$OUT/$name.log"
}

# state_profile: STATE when a tune wrote its profile there (checked per step: a `tune` earlier in
# this call may have), else nothing (the shipped profile); says which on stderr
state_profile() {
    local dir=""
    [ -f "$STATE/$KEY.yaml" ] && dir=$STATE
    echo "profile: ${dir:-shipped}" >&2
    echo "$dir"
}

for step in "$@"; do
    echo "=== $step ($(at))"
    case "$step" in
    conformance)  # every backend against the float64 reference (about 5 minutes on an H100)
        run conformance 330 1 "${PYTEST[@]}" -v -n 14 -m "gpu and not alone" tests/test_conformance.py ;;
    rest)  # the other GPU files, without the multi-GPU ones
        run rest 420 1 "${PYTEST[@]}" -v -n 14 -m "gpu and not alone" --ignore=tests/test_conformance.py \
            --ignore=tests/test_distributed_gpu.py ;;
    alone)  # timing assertions and large memory: one process; then the host cost per call (next step)
        run alone 400 1 "${PYTEST[@]}" -v -m "gpu and alone" ;&
    host)  # the host cost per call
        run host_cost 60 12 python3 -m flashdispatch.tools.host_cost ;;
    tune|resume)  # the quick grid into STATE/<key>.yaml (resume: keep the shapes already measured)
        flag=(); [ "$step" = resume ] && flag=(--resume)
        run tune 600 8 flashdispatch tune --quick "${flag[@]}" --out "$STATE/$KEY.yaml" \
            --state "$STATE/$KEY.state.json" --time-budget "$(($(left) - 40))"
        cp "$STATE/$KEY.yaml" "$STATE/$KEY.state.json" "$OUT/" 2>/dev/null ;;
    heldout)  # real model shapes outside the tune grid, on STATE's profile if there is one
        dir=$(state_profile)
        run heldout 600 6 env FLASHDISPATCH_PROFILE_DIR="$dir" flashdispatch bench --heldout --out "$OUT/heldout" \
            --time-budget "$(($(left) - 30))" ;;
    bench)  # the tuned grid: every provider and the dispatcher, on STATE's profile if there is one
        dir=$(state_profile)
        run bench 600 8 env FLASHDISPATCH_PROFILE_DIR="$dir" flashdispatch bench --out "$OUT/bench" --warmup-ms 20 \
            --rep-ms 300 --time-budget "$(($(left) - 30 < 330 ? $(left) - 30 : 330))" ;;
    serving)
        run serving 600 20 flashdispatch bench --serving --out "$OUT/serving" ;;
    demo)  # the README's demo on the GPU: which backend each step ran, and its time beside plain SDPA
        run demo 180 25 flashdispatch demo --json "$OUT/demo.json" ;;
    gluon)  # the Gluon forward's configs beside the default and plain SDPA (S = 1k, 4k, 16k)
        run gluon 300 30 python3 -m flashdispatch.tools.bench_gluon --quick --only-variants --out "$OUT/gluon" ;;
    backward)  # the Triton backward's configs beside FlexAttention's backward (window 4096 and causal, S=16k)
        run backward 300 30 python3 -m flashdispatch.tools.bench_backward --quick --out "$OUT/backward" ;;
    window)  # the sliding-window bars alone (S=16k: forward and forward+backward beside FlexAttention)
        run window 300 20 python3 -m flashdispatch.tools.bench_variants --quick --only window --out "$OUT/window" ;;
    variants)
        run variants 600 20 python3 -m flashdispatch.tools.bench_variants --out "$OUT/variants" ;;
    *)
        echo "unknown step '$step': expected conformance, rest, alone, host, tune, resume, heldout, bench, serving, demo, gluon, backward, window or variants" >&2
        exit 2 ;;
    esac
done
echo "done ($(at))"
