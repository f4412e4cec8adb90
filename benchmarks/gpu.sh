#!/usr/bin/env bash
# One prepared GPU session for issue 11 (budget: under 8 minutes on one H200): throughput of the
# Ark site visit against a bare timm loop on in-memory tensors (resnet50 and Swin-B at 224 px,
# bf16 + channels_last, batch 128, prepared-image cache, one DataLoader worker per core), peak GPU
# memory per batch size, and a short 3-site demo run at 224 px with resnet50 as an AUC sanity check.
# Worst case 8 min (every step has a timeout); typically ~4. Figures go to $OUT (default
# ./gpu-results): *.json, *.log. Run from the repository root:
#     bash benchmarks/gpu.sh
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
PY=${PY:-python}
export PYTHONPATH=${PYTHONPATH:-$PWD}
WORKERS=${WORKERS:-$(( $(nproc) > 16 ? 16 : $(nproc) ))}
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/summary.log"; }

log "GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
$PY -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__)" | tee -a "$OUT/summary.log"

# (c) peak memory per batch size (fast: a few steps per point)
log "peak GPU memory"
timeout 60 $PY benchmarks/gpu_memory.py --models resnet50,swin_base_patch4_window7_224 --batch-sizes 64,128,256 \
  --json "$OUT/gpu_memory.json" 2>&1 | tee "$OUT/gpu_memory.log"

# (b) site visit vs in-memory bare loop, 5 repeats x 20 steps after 3 warm-up steps
for MODEL in resnet50 swin_base_patch4_window7_224; do
  log "throughput $MODEL"
  timeout 120 $PY benchmarks/throughput.py --model "$MODEL" --img-size 224 --batch-size 128 --device cuda \
    --num-workers "$WORKERS" --cache --steps 20 --warmup-steps 3 --repeats 5 \
    --json "$OUT/throughput-$MODEL.json" 2>&1 | tee "$OUT/throughput-$MODEL.log"
done

# a short 3-site demo at 224 px with resnet50 (synthetic images): do the AUCs rise well above 0.5?
log "demo run"
rm -rf "$OUT/demo" && timeout 60 $PY -m arkfed demo-data "$OUT/demo" --size 256 > /dev/null
for y in "$OUT"/demo/sites/*.yaml; do printf 'cache: {mode: auto, dir: ../cache}\n' >> "$y"; done
SITES=$(ls "$OUT"/demo/sites/*.yaml | paste -sd, -)
timeout 120 $PY -m arkfed train --sites "$SITES" --model resnet50 --img-size 224 --batch-size 64 --rounds 4 \
  --lr 1e-3 --crop-scale 0.7,1 --device cuda --num-workers "$WORKERS" --out "$OUT/demo-run" --quiet \
  2>&1 | tee "$OUT/demo-run.log" | tail -30
log "done; results in $OUT"
