#!/usr/bin/env bash
# The GPU measurements issue 13 still waits for, one stage per device call (each stays under the device's 10-minute
# limit per command), in the order of what they decide. Run from the repository root on the GPU machine:
#   bash benchmarks/gpu_plan_issue13.sh STAGE OUT_DIR
# Stages:
#   variants the split-KV verify attention's whole round now that it compiles (its width symbols tied, 2026-12-05),
#            beside the shipped round, with a reduced draft vocabulary and one-GEMM projections (`combined`), and
#            autotuned GEMMs, in parallel processes (gpu_round_variants.py, ~6-8 min on an H200)
#   kernels  the verify attention kernels compiled with dynamic shapes, as the round compiles them (gpu_attention.py,
#            ~2-3 min), then the split-KV kernel's whole round beside the default's (kernel_rounds, ~5 min)
#   round    plain generate against the fast path over 9 length buckets, the round's cost, a second process
#   knobs    the round with a reduced draft vocabulary, with autotuned GEMMs, and fp32 equality on the GPU
# Copy what lands in OUT_DIR to results/*_<machine>.json / .log and add the figures to results/README.md.
set -euo pipefail
stage=${1:?usage: gpu_plan_issue13.sh variants|kernels|round|knobs OUT_DIR}
out=${2:?usage: gpu_plan_issue13.sh variants|kernels|round|knobs OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi") | tee "$out/machine.txt"
long_running() { python benchmarks/gpu_long_running.py "$@"; }
case "$stage" in
  variants)
    python benchmarks/gpu_round_variants.py --variants default,split_kv,combined,autotune --fp32-check \
      --out "$out/variants" 2>&1 | grep -v "^SUMMARY" | tee "$out/variants.log"
    ;;
  kernels)
    python benchmarks/gpu_attention.py --out "$out/attention.json" 2>&1 | tee "$out/attention.log"
    long_running --only kernel_rounds --no-precompile --compare-verify-attention specvlm_split_kv --budget 330 \
      --out "$out/kernel_rounds" 2>&1 | tee "$out/kernel_rounds.log"
    ;;
  round)
    long_running --only plain_static,fast,round_cost,second_process --budget 500 --out "$out/round" 2>&1 |
      tee "$out/round.log"
    ;;
  knobs)
    long_running --only round_cost --draft-vocab 8192 --budget 120 --out "$out/draft_vocab" 2>&1 |
      tee "$out/draft_vocab.log"
    long_running --only round_cost --max-autotune --budget 200 --out "$out/max_autotune" 2>&1 |
      tee "$out/max_autotune.log"
    long_running --only fp32_equality --budget 120 --out "$out/fp32" 2>&1 | tee "$out/fp32.log"
    ;;
  *)
    echo "unknown stage '$stage': use variants, kernels, round or knobs" >&2
    exit 2
    ;;
esac
