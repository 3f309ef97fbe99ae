#!/usr/bin/env bash
# Train the next medfm-litemedsam-ft on a GPU machine that has no internet and gets only this
# working tree: LiteMedSAM fully fine-tuned (image encoder at a low learning rate, prompt encoder,
# mask decoder) with mixed prompts (box, clicks, box + clicks, iterative correction) and robust
# input augmentation (resize kernel, blur, gamma), bf16, within a time budget.
#
# Needs .gpu/ from scripts/pack_for_device.py (the training split of the model card's data and the
# float16 base). Writes to $OUT (each file under 16 MiB): config.json, the trained weights as float16
# shards (model-encoder.safetensors, model-rest.safetensors), metrics.json, train.log.
#   OUT=/tmp/out bash scripts/device_train_default.sh                                   # the GPU run
#   OUT=/tmp/out DEVICE=cpu MAX_STEPS=2 BATCH=2 WORKERS=0 BF16=--fp32 bash scripts/device_train_default.sh  # smoke
set -euo pipefail
: "${OUT:?set OUT to the folder that receives the results}"
DEVICE=${DEVICE:-cuda}
BUDGET_MINUTES=${BUDGET_MINUTES:-6}
BATCH=${BATCH:-32}
WORKERS=${WORKERS:-14}
BF16=${BF16:---bf16}
STEPS=()
if [[ -n "${MAX_STEPS:-}" ]]; then STEPS=(--max-steps "$MAX_STEPS"); fi
export PYTHONUNBUFFERED=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
PYTHON=${PYTHON:-python3}
RUN=$(mktemp -d)/run
mkdir -p "$OUT"
[[ -d .gpu/data && -f .gpu/base/model.safetensors ]] || { echo ".gpu/ is missing: run scripts/pack_for_device.py first" >&2; exit 2; }
if [[ "$DEVICE" == cuda ]]; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true; fi

started=$(date +%s)
"$PYTHON" -m medfm train --recipe full --train-prompt-encoder --base .gpu/base --data .gpu/data --output "$RUN" \
  --prompt mixed --click-iterations 5 --robust-input --val-fraction 0.05 \
  --epochs 1000 --budget-minutes "$BUDGET_MINUTES" "${STEPS[@]}" --batch-size "$BATCH" \
  --lr 1e-4 --encoder-lr 2e-5 --warmup 0.05 --device "$DEVICE" "$BF16" --workers "$WORKERS" 2>&1 | tee "$OUT/train.log"
echo "trained in $(( $(date +%s) - started )) s" | tee -a "$OUT/train.log"

"$PYTHON" - "$RUN" "$OUT" <<'EOF'
"""The best model folder of the run as float16 shards under 16 MiB each, its config and metrics."""
import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

run, out = Path(sys.argv[1]), Path(sys.argv[2])
best = run / "best" if (run / "best" / "model.safetensors").is_file() else run / "last"
state = load_file(str(best / "model.safetensors"))
encoder = {k: v.half().contiguous() for k, v in state.items() if k.startswith("image_encoder.")}
rest = {k: v.half().contiguous() for k, v in state.items() if not k.startswith("image_encoder.")}
save_file(encoder, str(out / "model-encoder.safetensors"))
save_file(rest, str(out / "model-rest.safetensors"))
shutil.copy(best / "config.json", out / "config.json")
shutil.copy(run / "metrics.json", out / "metrics.json")
sizes = {p.name: round(p.stat().st_size / 2**20, 2) for p in out.iterdir()}
print(f"exported {best}: {len(state)} tensors; MiB {json.dumps(sizes)}", flush=True)
EOF
