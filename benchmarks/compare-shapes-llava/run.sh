#!/usr/bin/env bash
# crossget compare on the tiny shapes LLaVA (benchmarks/llava-small): the stock model and every method
# (ToMe, CrossGET training-free, FastV, VisionZip, DivPrune, DART) at 36 / 72 / 108 of its 144 visual
# tokens on the first 1000 shapes test questions, in one process on one core:
#   bash benchmarks/compare-shapes-llava/run.sh     (about 22 min training, if not trained yet, ~20 min comparing)
# Rerunning skips the runs already in runs/compare-shapes-llava/runs/ with the same settings.
source "$(dirname "${BASH_SOURCE[0]}")/../shapes-data.sh"   # repo root, $B, the data
OUT=benchmarks/compare-shapes-llava
M=runs/llava-small-train/model
TRAIN=(--model runs/llava-small --data runs/llava-small/train_by_image.json --images data/shapes/images
       --method none --trainable projector+lm --steps 150 --batch 32 --lr 3e-3 --threads 1 --max-minutes 22
       --out runs/llava-small-train)
if [ ! -f $M/config.json ]; then   # the tiny LLaVA as benchmarks/llava-small/run.sh trains it
  $B init-llava --out runs/llava-small --qa data/shapes-qa --by-image data/shapes-qa/train/llava_conversations.json
  $B train-llava "${TRAIN[@]}"
fi
# on a busy machine the 22 minutes end before step 150 (the committed run: step 117): go on from the checkpoint
if ! .venv/bin/python -c "import json, sys; sys.exit(json.load(open('runs/llava-small-train/training.json'))['loss'][-1]['step'] < 150)"; then
  $B train-llava "${TRAIN[@]}" --resume
fi
$B compare --model $M --methods all --keep 36,72,108 \
    --task shapes=vqa:data/shapes-qa/test/llava_questions.jsonl:data/shapes/images:data/shapes-qa/test/annotations.json \
    --batch 16 --max-new-tokens 3 --limit 1000 --threads 1 --out runs/compare-shapes-llava
cp runs/compare-shapes-llava/results.json runs/compare-shapes-llava/results.md runs/compare-shapes-llava/tradeoff.png $OUT/
cp runs/llava-small-train/training.json $OUT/training.json
.venv/bin/python $OUT/noise.py runs/compare-shapes-llava > $OUT/noise.md   # baseline, answers per type, paired differences
