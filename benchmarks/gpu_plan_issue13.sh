#!/usr/bin/env bash
# The GPU measurements issue 13 still waits for, one stage per device call (each stays under the device's 10-minute
# limit per command), in the order of what they decide. Run from the repository root on the GPU machine:
#   bash benchmarks/gpu_plan_issue13.sh STAGE OUT_DIR
# Run on an H100 2026-12-06 00:39-00:47 UTC (results/README.md): crash and crash_tiny (no crash with the fix; the
# diagnosis confirmed), and round without its profile. On an H100 2026-12-06 03:10-03:25 UTC: a variants run whose
# autotuning processes ran the GPU out of memory and met the joined + autotuned failure (the round now refuses that
# pair), the Triton round beside the default, and the attention kernels alone without the compiled ones (the Triton
# kernel lost both: results/README.md). On an H100 2026-12-06 05:30-06:05 UTC: variants and knobs as below (joined
# products won and are now the default; autotuning within noise; knobs' fp32 step did not finish in the call) and the
# round's cost and profile (results/README.md). On an H100 2026-12-06 07:59-08:07 UTC: fp8 (fp8 pays only for the
# wide products; the whole-draft swap cut the draft 0.56 ms, results/README.md). On an H200 2026-12-06 08:24-08:35
# UTC: fp8_head and fp8_head_qwen (results/README.md). On an H100 2026-12-06 11:05-11:50 UTC: topk (as topk_ahead),
# fp8_head_kernel and ab; then, 11:45 UTC, a stage for fp8 copies of the draft's own weights (a `use_fp8_weights` on
# the head's kernel: it did not pay and was removed; results/README.md). On an H100 2026-12-06 14:15-14:35 UTC:
# attention and ab_attention; 18:05-18:20 UTC: buckets_attention and check_attention's parts. Next: buckets_fixed;
# crash_nocudnn only if a crash comes back.
# Stages, in the order they were planned (the first is a correctness question, and decides whether the others' figures
# hold):
#   crash    first gpu_cublas_workspace.py (~1 min): whether graphs sharing torch's cuBLAS workspace break when CUDA
#            graph trees clear it (the diagnosis behind hf_internals.cublas_workspace_of_its_own, made on the CPU
#            2026-12-05 night); then the call sequence that met a CUDA illegal memory access on the 7B shape
#            (2026-12-05 17:40 UTC, after 9 kept buckets) again in bf16, now with the fix, with transformers'
#            compiled static-cache decoding interleaved as in that run (gpu_kept_buckets.py, ~6-8 min)
#   crash_tiny the same sequence on the tiny shape in bf16 (fp32 ran clean; small enough for compute-sanitizer)
#   crash_nocudnn  the same on the 7B shape with sdpa's cuDNN kernel disabled (pytorch#169849 reports illegal memory
#            accesses from cuDNN attention under CUDA graphs, but for cuDNN <= 9.15.0, and torch 2.11.0+cu130 pins
#            9.19.0.56: a weak lead; results now record the cuDNN version)
#   variants round variants in parallel processes (gpu_round_variants.py, waves sized by GPU memory): the shipped
#            round (joined projections, round.JOIN_PROJECTIONS, since 2026-12-06), separate projections, the shipped
#            round with an 8192-id draft vocabulary; the fp32 check with the shipped settings (~5-8 min)
#   round    plain generate against the fast path over 9 length buckets, the round's cost, a kernel profile, a
#            second process (the run that crashed; ~7 min)
#   fp8      whether e4m3 products of a draft level's 10 rows beat bf16 ones (gpu_fp8_draft.py: the 7B draft's
#            products, eager and compiled, the input's quantization counted), then the whole round with the draft on
#            them (gpu_round_variants.py fp8_draft, fp8_draft_vocab8k; ~6 min); cpu_fp8_draft.py has the acceptance
#            side
#   fp8_head the package's e4m3 draft head (`draft.use_fp8_head`) in the 7B round beside the default and the 8192-id
#            vocabulary, the fp32 check on it (gpu_round_variants.py, ~6 min); then, as `fp8_head_qwen` in a call of
#            its own, the Qwen2.5-VL-7B shape's round (152k vocabulary) with the head in bf16 and e4m3
#            (gpu_families.py, ~6 min)
#   fp8_head_kernel  the fp8 head's product as one Triton kernel on bf16 hidden states (fp8_head_triton.py) against
#            bf16 and the package's torch._scaled_mm, at the LLaVA-7B, Qwen2.5-VL-7B and Gemma-3-12B head shapes; if it
#            wins by more than noise, the package's `fp8_logits` should use it (~1 min)
#   topk     the tree's top-k as the package's Triton op against torch's topk alone (gpu_topk.py, ~1 min), then
#            the round with the op (`kernels.FUSED`) and with torch's topk, with the fp32 check on the shipped settings
#            (gpu_round_variants.py, ~6 min; run on 2026-12-06 as `topk_ahead`, with variants for a loop change since
#            removed)
#   ab       the round settings in one process, in turns (gpu_round_ab.py: shipped, with torch's topk, the fp8 head
#            on the package's Triton kernel and on torch._scaled_mm, the fp8 head with an 8192-id vocabulary; ~7 min),
#            so that cuts of a few tenths of a millisecond are not lost in the noise between processes
#   attention  the package's tree attention kernels (`kernels.tree_attention`, `verify_attention.TREE`) alone against
#            cuDNN's sdpa at a verify's 60 queries and a draft level's 10, over queries a program, programs a call,
#            tile skipping and warps (gpu_attention.py, ~3 min)
#   ab_attention  the round with them (the default since 2026-12-06 evening), without them, with them in the verify
#            only, and with every cut (fp8 head, 8192 ids), in one process in turns, then the fp32 check (gpu_round_ab.py,
#            ~7 min; run 14:25 UTC under the settings' earlier names, its fp32 check past the call's 10 minutes)
#   buckets_attention  what the attention kernels' Triton compiles cost a process at each new length bucket: the op
#            alone at every bucket width from 256 to 4096 with an empty Triton cache (gpu_attention_compile.py, ~1 min),
#            the kernels alone at 1024, 1280, 2048 slots, then the fast path's calls at 9 prompt lengths, 8 new buckets
#            (gpu_long_running.py, ~3 min). Run on an H100 2026-12-06 18:05 UTC (results/README.md): nothing compiled
#            after the first width; the first new bucket 17.7 s from a graph break since fixed (37d47ac)
#   buckets_fixed  the same sweep with that fix, and a second process on the disk cache (gpu_long_running.py --only
#            fast,second_process, ~5 min): whether every new bucket costs <= 2 s and the second process's first call
#            <= 15 s with the kernels. Not yet run: no machine could be started again on 2026-12-06 evening
#   check_attention  the fp32 check with the shipped settings (the attention kernels' loops with runtime bounds), then
#            the round with and without the kernels in one process, in turns (gpu_round_ab.py, ~6 min in all). Run
#            as separate calls on an H100 2026-12-06 18:10 UTC (results/README.md)
#   knobs    the round with a reduced draft vocabulary, with autotuned GEMMs (round.AUTOTUNE_GEMMS beside the default,
#            one wave: an autotuning process holds ~24 GB), and fp32 equality on the GPU
# Copy what lands in OUT_DIR to results/*_<machine>.json / .log and add the figures to results/README.md.
set -euo pipefail
usage="usage: gpu_plan_issue13.sh crash|crash_tiny|crash_nocudnn|variants|round|knobs|fp8|fp8_head|fp8_head_qwen|fp8_head_kernel|topk|ab|attention|ab_attention|buckets_attention|buckets_fixed|check_attention OUT_DIR"
stage=${1:?$usage}
out=${2:?$usage}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi") | tee "$out/machine.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())" |
  tee -a "$out/machine.txt"
long_running() { python benchmarks/gpu_long_running.py "$@"; }
case "$stage" in
  crash)
    python benchmarks/gpu_cublas_workspace.py --out "$out/cublas_workspace.json" 2>&1 | tee "$out/cublas_workspace.log"
    # with the fix; should it still crash, run it again with CUDA_LAUNCH_BLOCKING=1 (slower: the call that made the
    # illegal access then raises it)
    python benchmarks/gpu_kept_buckets.py --seven-b --modes precompiled_static_plain --timeout 480 2>&1 |
      tee "$out/crash_7b.log"
    ;;
  crash_tiny)
    python benchmarks/gpu_kept_buckets.py --tiny-dtype bfloat16 --modes precompiled_static_plain 2>&1 |
      tee "$out/crash_tiny_bf16.log"
    ;;
  crash_nocudnn)
    python benchmarks/gpu_kept_buckets.py --seven-b --no-cudnn-sdpa --modes precompiled_static_plain 2>&1 |
      tee "$out/crash_7b_nocudnn.log"
    ;;
  variants)
    python benchmarks/gpu_round_variants.py --variants default,separate,vocab8k \
      --fp32-check --fp32-variant default --compile-seconds 420 --deadline 575 --out "$out/variants" \
      2>&1 | grep -v "^SUMMARY" | tee "$out/variants.log"
    ;;
  round)
    long_running --only plain_static,fast,round_cost,profile,second_process --budget 430 --out "$out/round" 2>&1 |
      tee "$out/round.log"
    ;;
  fp8)
    python benchmarks/gpu_fp8_draft.py --out "$out/fp8_draft.json" 2>&1 | tee "$out/fp8_draft.log"
    python benchmarks/gpu_round_variants.py --variants default,fp8_draft,fp8_draft_vocab8k --compile-seconds 300 \
      --deadline 480 --out "$out/fp8_round" 2>&1 | grep -v "^SUMMARY" | tee "$out/fp8_round.log"
    ;;
  fp8_head)
    python benchmarks/gpu_round_variants.py --variants default,fp8_head,vocab8k,fp8_head_vocab8k --fp32-check \
      --fp32-variant fp8_head --compile-seconds 360 --deadline 540 --out "$out/fp8_head" 2>&1 | grep -v "^SUMMARY" |
      tee "$out/fp8_head.log"
    ;;
  fp8_head_qwen)
    python benchmarks/gpu_families.py --shapes qwen2.5-vl-7b --labels full_vocab,full_vocab_fp8_head \
      --out "$out/families_fp8_head.json" 2>&1 | tee "$out/families_fp8_head.log"
    ;;
  topk)
    python benchmarks/gpu_topk.py --out "$out/topk.json" 2>&1 | tee "$out/topk.log"
    python benchmarks/gpu_round_variants.py --variants default,torch_topk --fp32-check --fp32-variant default \
      --compile-seconds 330 --deadline 500 --out "$out/topk" 2>&1 | grep -v "^SUMMARY" | tee "$out/topk.log"
    ;;
  ab)
    TORCHINDUCTOR_COMPILE_THREADS=16 python benchmarks/gpu_round_ab.py --warm-seconds 420 --out "$out/ab.json" 2>&1 |
      grep -v "UserWarning\|return func\|warnings.warn" | tee "$out/ab.log"
    ;;
  attention)
    kinds=sdpa_default,package_tree
    for rows in 16 32 64; do for programs in 128 256 512; do for mode in b p; do for warps in 4 8; do
      kinds=$kinds,package_tree_r${rows}_p${programs}_${mode}_w$warps
    done; done; done; done
    for queries in 60 10; do  # a verify's tree nodes; a draft level's frontier
      python benchmarks/gpu_attention.py --queries $queries --widths 1024,2048 --variants $kinds \
        --out "$out/attention_q$queries.json" 2>&1 | tee "$out/attention_q$queries.log"
    done
    ;;
  ab_attention)
    TORCHINDUCTOR_COMPILE_THREADS=16 python benchmarks/gpu_round_ab.py --warm-seconds 330 --out "$out/ab.json" \
      --settings shipped,own_attention,verify_tree_attention,fp8_head_vocab8k --fp32-check shipped 2>&1 | grep -v "UserWarning\|return func\|warnings.warn" | tee "$out/ab.log"
    ;;
  buckets_attention)
    python benchmarks/gpu_attention_compile.py --out "$out/attention_compile.json" 2>&1 | tee "$out/attention_compile.log"
    for queries in 60 10; do  # the kernels' loops over slices and steps have runtime bounds since 2026-12-06 night
      rows=$([ $queries = 60 ] && echo 32 || echo 16)
      python benchmarks/gpu_attention.py --queries $queries --widths 1024,1280,2048 \
        --variants sdpa_default,package_tree,package_tree_r${rows}_p128_p_w4,package_tree_r${rows}_p512_p_w4 \
        --out "$out/attention_q$queries.json" 2>&1 | tee "$out/attention_q$queries.log"
    done
    TORCHINDUCTOR_COMPILE_THREADS=16 long_running --only fast --budget 120 --out "$out/buckets" 2>&1 |
      grep -v "pow_by_natural\|UserWarning\|return func\|warnings.warn" | tee "$out/buckets.log"
    ;;
  buckets_fixed)
    TORCHINDUCTOR_COMPILE_THREADS=16 long_running --only fast,second_process --budget 400 --out "$out/buckets" 2>&1 |
      grep -v "pow_by_natural\|UserWarning\|return func\|warnings.warn" | tee "$out/buckets.log"
    ;;
  check_attention)
    long_running --only fp32_equality --budget 120 --out "$out/fp32" 2>&1 | tee "$out/fp32.log"
    TORCHINDUCTOR_COMPILE_THREADS=16 timeout 450 python benchmarks/gpu_round_ab.py --warm-seconds 240 \
      --out "$out/ab.json" --settings shipped,own_attention 2>&1 | grep -v "UserWarning\|return func\|warnings.warn" |
      tee "$out/ab.log"
    ;;
  fp8_head_kernel)
    python benchmarks/fp8_head_triton.py --out "$out/fp8_head_triton.json" 2>&1 | tee "$out/fp8_head_triton.log"
    ;;
  knobs)
    long_running --only round_cost --draft-vocab 8192 --budget 120 --out "$out/draft_vocab" 2>&1 |
      tee "$out/draft_vocab.log"
    python benchmarks/gpu_round_variants.py --variants default,autotune_gemms --deadline 330 \
      --out "$out/autotune_gemms" 2>&1 | grep -v "^SUMMARY" | tee "$out/autotune_gemms.log"
    long_running --only fp32_equality --budget 120 --out "$out/fp32" 2>&1 | tee "$out/fp32.log"
    ;;
  *)
    echo "unknown stage '$stage': see the stages above" >&2
    exit 2
    ;;
esac
