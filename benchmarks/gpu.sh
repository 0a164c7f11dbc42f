#!/usr/bin/env bash
# GPU throughput check: the engine on a LLaVA-LLaMA-3-8B-shaped model with random bf16 weights (built on
# the GPU), eager and --compile, at batch 32, auto, 8 and 1, 100 new tokens per image (forced), and the
# table of images/s. One H100 or H200, no network; needs python3 with torch, transformers, pillow and
# tokenizers only (no bitsandbytes, no scoring packages). It cycles the images in tests/data/real_images.
#
#   bash benchmarks/gpu.sh            # the table is printed last; with RESULTS_DIR=DIR also DIR/throughput.md
#   bash benchmarks/gpu.sh --layers 1 --max_new_tokens 2 --batch_sizes 2 auto   # smoke test (later flags win)
#
# Budget (H100, estimated, not measured): building the model ~30 s; the auto probe ~30 s (batch 8, 16, ...
# each a 100-token generate); eager decoding is host-bound at ~30-40 ms a step, so 100 steps ~3.5 s a
# batch plus ~20 ms of prefill an image: batch 1 on 4 images ~14 s, batch 8 and 32 on 2 batches ~8-10 s,
# auto (up to 256) on 2 batches ~20 s; compiled steps ~6-13 ms, so every compiled run takes under 15 s,
# but each compiled batch size first compiles (~1 min each, unmeasured). Each configuration is set up and
# timed once in order (batch 32 first), then a second interleaved round runs if time is left: no run
# starts after 360 s, and `timeout` stops everything at 540 s; the table so far is kept either way.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
PYTHON=${PYTHON:-python3}
TABLE=${RESULTS_DIR:+$RESULTS_DIR/throughput.md}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PYTHON -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
timeout 540 $PYTHON benchmarks/throughput.py --full_size --contenders engine --compile both \
    --batch_sizes 32 auto 8 1 --num_images 4 --batches_per_config 2 --max_new_tokens 100 \
    --repeats 2 --budget_s 360 ${TABLE:+--table "$TABLE"} "$@" 2>&1 | tee ${RESULTS_DIR:+"$RESULTS_DIR/gpu.log"}
status=${PIPESTATUS[0]}
if [ "$status" = 124 ] && [ -n "$TABLE" ] && [ -f "$TABLE" ]; then
    echo "stopped at the time limit; the table so far:"
    cat "$TABLE"
fi
exit "$status"
