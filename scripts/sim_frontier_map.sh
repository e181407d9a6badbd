#!/usr/bin/env bash
# The simulated SLO frontier map (issues 16-18, no GPU): derived profiles for Qwen2.5-32B,
# Mixtral-8x7B, Qwen3-30B-A3B (MoE) and Llama-3.1-70B FP8 on the H100 and the H200 from the
# measured H100 8B profile, then `rapidserve simulate --itl-slos` for each (model, GPU, dataset)
# into docs/results/2026-11-30-sim/frontier-*/ (frontier.json/csv/png only; the per-request
# records stay in $WORK). Rates bracket each case's knees (found by a first pass).
#   bash scripts/sim_frontier_map.sh                    # all cases (~2-6 min each on 2 cores)
#   bash scripts/sim_frontier_map.sh 32b-h200-lmsys     # one case (derives only the profile it needs)
#   bash scripts/sim_frontier_map.sh profiles           # every derived profile, no simulation
#   JOBS=1 nice -n 19 bash scripts/sim_frontier_map.sh mixtral-h200-lmsys   # on shared cores
# JOBS (default 2): simulations at once. COST_ERROR (e.g. decode:split:+40%): passed as
# --cost-error; the results then go to frontier-<case>-split-error/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
RS="$PY -m rapidserve.entrypoints.cli"
RES=docs/results/2026-11-30-sim
WORK=${WORK:-/tmp/sim-frontier-map}
JOBS=${JOBS:-2}
H100=docs/results/2026-11-23-h100/profile.json
H200=(--bandwidth-scale 1.433 --gpu-name "NVIDIA H200 141GB HBM3e")
mkdir -p "$RES/profiles" "$WORK"

derive() {  # profile file name -> derived from the H100 8B profile (once per run)
    local out=$RES/profiles/$1
    [ -n "${DERIVED[$1]:-}" ] && return 0
    case "$1" in
        qwen2.5-32b-h100.json)        $RS profile --derive-from $H100 --model preset:qwen2.5-32b --output "$out" ;;
        qwen2.5-32b-h200.json)        $RS profile --derive-from $H100 --model preset:qwen2.5-32b "${H200[@]}" --output "$out" ;;
        llama-3.1-8b-h200.json)       $RS profile --derive-from $H100 --model preset:llama-3.1-8b "${H200[@]}" --output "$out" ;;
        mixtral-8x7b-h100.json)       $RS profile --derive-from $H100 --model preset:mixtral-8x7b --output "$out" ;;
        mixtral-8x7b-h200.json)       $RS profile --derive-from $H100 --model preset:mixtral-8x7b "${H200[@]}" --output "$out" ;;
        qwen3-30b-a3b-h100.json)      $RS profile --derive-from $H100 --model preset:qwen3-30b-a3b --output "$out" ;;
        qwen3-30b-a3b-h200.json)      $RS profile --derive-from $H100 --model preset:qwen3-30b-a3b "${H200[@]}" --output "$out" ;;
        llama-3.1-70b-fp8-h200.json)  $RS profile --derive-from $H100 --model preset:llama-3.1-70b --quantization fp8 \
                                          --kv-cache-dtype fp8 --fp8-flops-scale 2.0 "${H200[@]}" --output "$out" ;;
        *) echo "unknown profile $1" >&2; exit 2 ;;
    esac
    DERIVED[$1]=1
}
declare -A DERIVED=()
CONFIGS=hybrid-128,hybrid-256,hybrid-512,hybrid-1024,hybrid-2048,disagg,rapid-rapid,rapid-nexus
CONFIGS=$CONFIGS,rapid-static:16,rapid-static:32,rapid-static:48,rapid-static:64

case_args() {  # name -> profile dataset rates ("-" profile: the measured H100 one)
    case "$1" in
        8b-h100-lmsys)       echo "- lmsys-like 2,4,6,8,10,12,16,20" ;;
        8b-h100-arxiv)       echo "- arxiv-like 0.5,1,1.5,2,2.5,3,4,5" ;;
        8b-h200-lmsys)       echo "llama-3.1-8b-h200.json lmsys-like 2,4,6,8,10,12,16,20" ;;
        32b-h100-lmsys)      echo "qwen2.5-32b-h100.json lmsys-like 0.25,0.5,0.75,1,1.25,1.5,2,2.5" ;;
        32b-h100-arxiv)      echo "qwen2.5-32b-h100.json arxiv-like 0.05,0.1,0.15,0.2,0.3,0.4,0.5,0.7" ;;
        32b-h200-lmsys)      echo "qwen2.5-32b-h200.json lmsys-like 0.5,1,1.5,2,2.5,3,4,5" ;;
        32b-h200-arxiv)      echo "qwen2.5-32b-h200.json arxiv-like 0.05,0.1,0.15,0.2,0.3,0.4,0.5,0.7" ;;
        mixtral-h200-lmsys)  echo "mixtral-8x7b-h200.json lmsys-like 0.5,1,1.5,2,3,4,6,8" ;;
        mixtral-h200-arxiv)  echo "mixtral-8x7b-h200.json arxiv-like 0.1,0.2,0.3,0.5,0.75,1,1.5,2" ;;
        70b-fp8-h200-lmsys)  echo "llama-3.1-70b-fp8-h200.json lmsys-like 0.25,0.5,0.75,1,1.25,1.5,2,2.5" ;;
        70b-fp8-h200-arxiv)  echo "llama-3.1-70b-fp8-h200.json arxiv-like 0.05,0.1,0.15,0.2,0.3,0.4,0.5,0.7" ;;
        *) echo "unknown case $1" >&2; exit 2 ;;
    esac
}
CASES=("$@")
[ ${#CASES[@]} -gt 0 ] || CASES=(8b-h100-lmsys 8b-h100-arxiv 32b-h100-lmsys 32b-h100-arxiv 32b-h200-lmsys 32b-h200-arxiv
                                 8b-h200-lmsys mixtral-h200-lmsys mixtral-h200-arxiv 70b-fp8-h200-lmsys 70b-fp8-h200-arxiv)
if [ "${CASES[*]}" = profiles ]; then
    for p in qwen2.5-32b-h100 qwen2.5-32b-h200 llama-3.1-8b-h200 mixtral-8x7b-h100 mixtral-8x7b-h200 \
             qwen3-30b-a3b-h100 qwen3-30b-a3b-h200 llama-3.1-70b-fp8-h200; do
        derive $p.json
    done
    exit 0
fi
for c in "${CASES[@]}"; do
    read -r profile dataset rates <<< "$(case_args "$c")"
    if [ "$profile" = - ]; then
        profile=$H100
    else
        derive "$profile"
        profile=$RES/profiles/$profile
    fi
    start=$SECONDS
    out=$c${COST_ERROR:+-split-error}
    rm -rf "$WORK/$out"
    $RS simulate --profile "$profile" --configs "$CONFIGS" --request-rates "$rates" --dataset-name "$dataset" \
        --num-prompts 200 --seed 0 --itl-slos 1.5x,2x,3x,6x --jobs "$JOBS" --quiet --output-dir "$WORK/$out" \
        ${COST_ERROR:+--cost-error "$COST_ERROR"} | tee "$WORK/$out.txt"
    mkdir -p "$RES/frontier-$out"
    cp "$WORK/$out"/frontier.{json,csv,png} "$WORK/$out.txt" "$RES/frontier-$out/"
    mv "$RES/frontier-$out/$out.txt" "$RES/frontier-$out/frontier.txt"
    echo "$out: $((SECONDS - start)) s wall"
done
