#!/usr/bin/env bash
# Every issue-15 benchmark, one command per machine (each step fits a 10-minute command limit).
# Results (JSON) go to $RESULTS (default bench/results/); inputs are generated locally, no network.
#
#   bench/run_all.sh cpu          # quiet CPU machine, 1.1B: apply (kernel, torch path, cold CLI),
#                                 # verify, PEFT, cat+sync, cat; the CPU work floor (cpu_floor.py);
#                                 # then ONNX fold at 8B shapes, 8 layers
#   bench/run_all.sh h200-apply   # H200: 8B bf16 --device cuda: apply, cold CLI, verify vs cat+sync
#   bench/run_all.sh h200-cpu     # same checkpoint, --device cpu (all cores)
#   bench/run_all.sh h200-premerge  # --device cpu, the CLI without and with the premerge worker
#                                 # (on by default there: 16 cores; LORAMERGE_PREMERGE=0 turns it off)
#   bench/run_all.sh h200-premerge-cuda  # the same with --device cuda (the head start writes the
#                                 # worker's results while torch imports; the GPU does the rest)
#   bench/run_all.sh h200-trace   # --device cpu, three cold CLI runs under bench/trace_cold.py: when
#                                 # the worker's results came, were written early and were taken
#   bench/run_all.sh h200-onnx    # 8B fp16 graph with external data (16 GB) fold vs copy; frees the
#                                 # apply checkpoint first (a 64 GB disk holds graph + base + output)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
RESULTS=${RESULTS:-bench/results}
WORK=${WORK:-bench/work}
mkdir -p "$RESULTS" "$WORK"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
stamp=$(date -u +%Y%m%d-%H%M)

case "${1:-}" in
  cpu)
    "$PY" bench/bench_apply.py --preset 1b --runs 3 --workdir "$WORK" \
      --methods loramerge,cli,torchpath,verify,peft,floor,cat --results "$RESULTS/cpu-1b-issue15-$stamp.json"
    "$PY" bench/cpu_floor.py "$WORK/base-1b" "$WORK/adapter-1b-r16" --runs 3 --json "$RESULTS/cpu-1b-floor-$stamp.json"
    "$PY" bench/bench_onnx_scale.py --layers 8 --runs 3 --workdir "$WORK" \
      --results "$RESULTS/cpu-onnx-8b-l8-$stamp.json" --clean
    ;;
  h200-apply)
    "$PY" bench/bench_apply.py --preset 8b --device cuda --runs 3 --workdir "$WORK" \
      --methods loramerge,cli,verify,floor --results "$RESULTS/gpu-h200-8b-issue15-$stamp.json"
    ;;
  h200-cpu)
    "$PY" bench/bench_apply.py --preset 8b --device cpu --runs 3 --workdir "$WORK" \
      --methods loramerge,cli,floor --results "$RESULTS/gpu-h200-8b-cpu16-issue15-$stamp.json"
    ;;
  h200-premerge)
    "$PY" bench/bench_apply.py --preset 8b --device cpu --runs 3 --workdir "$WORK" \
      --methods cli:LORAMERGE_PREMERGE=0,cli,floor --results "$RESULTS/gpu-h200-8b-cpu-premerge-$stamp.json"
    ;;
  h200-premerge-cuda)
    "$PY" bench/bench_apply.py --preset 8b --device cuda --runs 3 --workdir "$WORK" \
      --methods cli,cli:LORAMERGE_PREMERGE=1,floor --results "$RESULTS/gpu-h200-8b-cuda-premerge-$stamp.json"
    ;;
  h200-trace)
    "$PY" bench/bench_apply.py --preset 8b --device cpu --runs 1 --workdir "$WORK" --methods floor  # the inputs
    for i in 1 2 3; do
      rm -rf "$WORK/out-trace"
      "$PY" bench/trace_cold.py "$RESULTS/gpu-h200-8b-cold-trace-$stamp-$i.json" apply "$WORK/base-8b" \
        "$WORK/adapter-8b-r16" "$WORK/out-trace" -q --device cpu --json > /dev/null
    done
    rm -rf "$WORK/out-trace"
    ;;
  h200-onnx)
    rm -rf "$WORK"/base-8b "$WORK"/adapter-8b-* "$WORK"/out-*
    "$PY" bench/bench_onnx_scale.py --preset 8b --device cuda --runs 2 --workdir "$WORK" \
      --results "$RESULTS/gpu-h200-onnx-8b-$stamp.json" --clean
    ;;
  *)
    sed -n '2,16p' "$0"
    exit 2
    ;;
esac
