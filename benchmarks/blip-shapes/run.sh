#!/usr/bin/env bash
# Train the small BLIP captioner and VQA model on the shapes data (vision tower from the shipped
# CLIP), then score unreduced, ToMe and CrossGET at 0.58 of the vision GFLOPs:
#   bash benchmarks/blip-shapes/run.sh      (about 25 + 25 min training, ~20 min evaluation, one core)
# The committed results used the current default model (stage 9).
source "$(dirname "${BASH_SOURCE[0]}")/../shapes-data.sh"   # repo root, $B, the data
OUT=benchmarks/blip-shapes
$B train-blip --task caption --data data/shapes/dataset_shapes.json --out runs/blip-shapes-caption --steps 550 --batch 32 --threads 1 --max-minutes 25
$B train-blip --task vqa --data data/shapes-qa/train/questions.json --images data/shapes/images --out runs/blip-shapes-vqa --steps 550 --batch 32 --threads 1 --max-minutes 25
C=(--data data/shapes-qa/test/captions.json --images data/shapes/images --max-length 45 --threads 1 --limit 500)
V=(--data data/shapes-qa/test/questions.json --annotations data/shapes-qa/test/annotations.json --images data/shapes/images
   --image-pattern 'shapes_{image_id:06d}.png' --threads 1 --limit 2000)
for m in none tome crossget; do
  a=(--method "$m"); [ "$m" != none ] && a+=(--flops 0.58)
  $B eval caption --model runs/blip-shapes-caption "${C[@]}" "${a[@]}" --json "$OUT/caption-$m.json"
  $B eval vqa --model runs/blip-shapes-vqa "${V[@]}" "${a[@]}" --json "$OUT/vqa-$m.json"
done
.venv/bin/python $OUT/table.py "$OUT"
