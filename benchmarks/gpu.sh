#!/usr/bin/env bash
# GPU throughput check in about 5 minutes: the generation core on a LLaVA-LLaMA-3-8B-shaped model with random
# bf16 weights built on the GPU, compiled rows first (static cache + torch.compile, then eager) at fixed
# batch sizes 128, 32 and 8, 100 new tokens per image (forced); then, while time is left, the A/B rows with
# transformers' own SDPA attention at batch 32 and the LoRA merged-vs-unmerged decoding step. One H100 or
# H200, no network; needs python3 with torch, transformers, pillow and tokenizers (no bitsandbytes).
#
#   bash benchmarks/gpu.sh              # the table is printed last; everything is kept in RESULTS_DIR
#   bash benchmarks/gpu.sh --dry-run    # the same plan on CPU: tiny model (1 text layer, 8 query / 2 KV
#                                       # heads), 2 new tokens, compile backend eager; under 3 minutes
#   RESULTS_DIR=out LIMIT_S=400 bash benchmarks/gpu.sh --repeats 5   # further flags go to throughput.py
#
# Its own clock (LIMIT_S, default 300 s; 170 s for --dry-run): throughput.py starts no run that would end
# after 3/4 of it, and is stopped at 17/20 of it (SIGTERM: it prints the table so far); the adapter rows run
# only if 40 s (dry run: 20 s) are left, and are stopped at the limit. Images are preprocessed once, before
# any timing; each configuration is run untimed on every prompt length it will be timed on (the compile);
# TORCH_LOGS=recompiles prints any recompile, and a row says so if one happened inside a timed run. Answers
# are compared as token IDs, compiled rows with the eager row of their batch size.
# Exit status: throughput.py's (0: answers agree, 1: a row failed or disagreed, 124/130/137: stopped).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
dry_run=0
forwarded=()
for arg in "$@"; do
    if [ "$arg" = --dry-run ]; then dry_run=1; else forwarded+=("$arg"); fi
done
if [ "$dry_run" = 1 ]; then
    LIMIT_S=${LIMIT_S:-170}
    model=(--dry_run --max_new_tokens 2)
    adapter=(--device cpu --layers 2 --hidden 256 --intermediate 512 --heads 8 --kv_heads 2 --batch_size 2
             --prompt_tokens 64 --new_tokens 4 --repeats 1)
    adapter_min_s=20
else
    LIMIT_S=${LIMIT_S:-300}
    model=(--full_size --max_new_tokens 100)
    adapter=(--device cuda --layers 32 --hidden 4096 --intermediate 14336 --heads 32 --kv_heads 8 --batch_size 8
             --prompt_tokens 600 --new_tokens 32 --repeats 3)
    adapter_min_s=40
fi
RESULTS_DIR=${RESULTS_DIR:-results/gpu-$(date +%Y%m%d-%H%M%S)$([ "$dry_run" = 1 ] && echo -dry-run)}
mkdir -p "$RESULTS_DIR"
LOG=$RESULTS_DIR/gpu.log
TABLE=$RESULTS_DIR/throughput.md
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
export TORCH_LOGS=${TORCH_LOGS:-recompiles}
PYTHON=${PYTHON:-python3}
interrupted=0
trap 'interrupted=1' INT  # Ctrl-C: throughput.py prints the table so far; nothing starts after it

left() { echo $((LIMIT_S - (SECONDS - start))); }

{
    echo "gpu.sh: results in $RESULTS_DIR, limit ${LIMIT_S} s$([ "$dry_run" = 1 ] && echo ', dry run on CPU')"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PYTHON -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
} 2>&1 | tee -i "$LOG"

budget=$((LIMIT_S * 3 / 4 - (SECONDS - start)))
hard=$((LIMIT_S * 17 / 20 - (SECONDS - start)))
timeout -k 15 "$hard" $PYTHON benchmarks/throughput.py "${model[@]}" --contenders generate --compile both \
    --batch_sizes 128 32 8 --num_images 32 --batches_per_config 1 --repeats 3 --ab_batch_size 32 \
    --budget_s "$budget" --table "$TABLE" "${forwarded[@]}" 2>&1 | tee -i -a "$LOG"
status=${PIPESTATUS[0]}
if [ "$status" = 137 ] && [ -f "$TABLE" ]; then  # killed before it could print: the table of its last run
    echo "throughput.py was killed at the time limit; the table so far:" | tee -i -a "$LOG"
    tee -i -a "$LOG" < "$TABLE"
fi

if [ "$interrupted" = 0 ] && [ "$(left)" -ge "$adapter_min_s" ]; then
    echo -e "\nLoRA adapter merged vs unmerged, per decoding step ($(left) s left):" | tee -i -a "$LOG"
    timeout -k 5 "$(left)" $PYTHON benchmarks/adapter_merge.py "${adapter[@]}" 2>&1 | tee -i -a "$LOG"
else
    echo "adapter rows skipped: $(left) s left" | tee -i -a "$LOG"
fi
echo "gpu.sh: $((SECONDS - start)) s; table: $TABLE; log: $LOG" | tee -i -a "$LOG"
exit "$status"
