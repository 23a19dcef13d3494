#!/usr/bin/env bash
# The tables of docs/BENCHMARKS.md. From the repository root:
#
#     bash benchmarks/lake_tables.sh [STEP...]      (default: every step; output under runs/benchmarks/)
#
# Steps: eval, layers, multiblock, mobilenet, shots, wide, clip, clip_k. Each step is one lakead command; its
# table is OUT/<step>/ablation.md, baselines.md or report.md, and the exact command is recorded in it.
set -euo pipefail
DATA=${DATA:-../shared/data}
MODEL=${MODEL:-../shared/models/mobilenetv2-12-int8.onnx}
OUT=${OUT:-runs/benchmarks}
CLIP_DIR=${CLIP_DIR:-$OUT/clip-vit-b-16-random}
MOBILENET="--backbone onnx:$MODEL --batch-size 16"
SEEDS=0,1,2

step_eval() {  # the evaluation report: tensor 400, top 32 of 64 channels, 64 shots (all of tile and tire, 41 of plate)
  lakead eval "$DATA" --out "$OUT/eval" $MOBILENET --layer 400 --k 32 --shots 64
}

step_layers() {  # which MobileNetV2 tensor: every channel (no selection), all shots
  lakead ablate "$DATA" --out "$OUT/layers" $MOBILENET --layer 365,400,426,591,452,627 --selection all --shots all
}

step_mobilenet() {  # top-k vs random-k vs bottom-k vs all 64 channels, and a k sweep, at tensor 400 (64 x 14 x 14)
  lakead ablate "$DATA" --out "$OUT/mobilenet" $MOBILENET --layer 400 --k 4,8,16,32 \
    --selection top,random,bottom,all --seeds $SEEDS --shots all
}

step_shots() {  # shots 1, 4, 16, all at k = 8 of 64 (about the paper's 100 of 1024)
  lakead ablate "$DATA" --out "$OUT/shots" $MOBILENET --layer 400 --k 8 \
    --selection top,random,bottom,all --seeds $SEEDS --shots 1,4,16,all
}

step_multiblock() {  # several tensors on one grid: 365 (32 x 28 x 28) average-pooled 2 x 2 to the 14 x 14 of 426 (96 ch),
  # every channel (128), all shots; then the same pair on the finer 28 x 28 grid (426 upsampled bilinearly)
  lakead ablate "$DATA" --out "$OUT/multiblock" $MOBILENET --layer 365,426,365+426 --selection all --shots all --no-text
  lakead ablate "$DATA" --out "$OUT/multiblock-finest" $MOBILENET --layer 365+426 --block-grid finest --selection all \
    --shots all --no-text
}

step_wide() {  # the same question on a wide tensor: 591 (576 x 14 x 14, an expansion layer), k = 58 (10 %); "all" is in the layers table
  lakead ablate "$DATA" --out "$OUT/wide" $MOBILENET --layer 591 --k 58 --selection top,random,bottom \
    --seeds $SEEDS --shots all
}

clip_model() {  # a random-weight CLIP ViT-B/16 (224 px, 12 blocks, width 768): NOT pretrained
  [ -f "$CLIP_DIR/config.json" ] || python -m lakead.testing vit-b-16 "$CLIP_DIR" --seed 0
}

step_clip() {  # the baselines with the random CLIP (layer 9 of 12, k = 100 of 768, 16 shots)
  clip_model
  lakead baselines "$DATA" --out "$OUT/clip" --backbone "$CLIP_DIR" --layer 9 --k 100 --shots 16 \
    --methods lake,visual,all,random,bottom,text --seeds $SEEDS --batch-size 16
}

step_clip_k() {  # the random CLIP, visual branch: top vs random vs bottom vs all, k sweep, 16 shots
  clip_model
  lakead ablate "$DATA" --out "$OUT/clip_k" --backbone "$CLIP_DIR" --layer 9 --no-text --k 25,100,400 \
    --selection top,random,bottom,all --seeds $SEEDS --shots 16 --batch-size 16
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(eval layers multiblock mobilenet shots wide clip clip_k)
for s in "${steps[@]}"; do
  echo "== $s: $(date -u +%FT%TZ)"
  start=$(date +%s)
  "step_$s"
  echo "== $s done in $(( $(date +%s) - start )) s"
done
