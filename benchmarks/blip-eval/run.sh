#!/usr/bin/env bash
# Time the four BLIP evaluation harnesses on random-weight BLIP-base (ViT-B/16, 384 px) and a few
# generated images: unreduced, ToMe and CrossGET at the same r. Scores of random weights mean
# nothing; GFLOPs and throughput are those of the real model size.
#   bash benchmarks/blip-eval/run.sh [INPUTS_DIR] [R] [THREADS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
D=${1:-/tmp/blip-eval}
R=${2:-24}
T=${3:-2}
OUT=benchmarks/blip-eval
BIN=.venv/bin
[ -d "$D/itm" ] || $BIN/python $OUT/make_inputs.py --out "$D"
for m in none tome crossget; do
  a=(--method "$m" --threads "$T" --batch 8)
  [ "$m" != none ] && a+=(--r "$R")
  $BIN/crossget eval itm-retrieval --model "$D/itm" --data "$D/data/dataset_shapes.json" --k 8 "${a[@]}" --json "$OUT/itm-retrieval-$m.json"
  $BIN/crossget eval caption --model "$D/caption" --data "$D/data/captions_gt.json" "${a[@]}" --json "$OUT/caption-$m.json"
  $BIN/crossget eval vqa --model "$D/vqa" --data "$D/data/questions.json" --annotations "$D/data/annotations.json" "${a[@]}" --json "$OUT/vqa-$m.json"
  $BIN/crossget eval nlvr2 --model "$D/itm" --data "$D/data/dev.json" "${a[@]}" --json "$OUT/nlvr2-$m.json"
done
$BIN/python $OUT/table.py "$OUT"
