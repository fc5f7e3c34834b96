#!/usr/bin/env bash
# Build and train the tiny LLaVA on the shapes questions (shipped CLIP tower, 4 x 256 Llama), then
# answer 1000 test questions unreduced and with every method at 36 / 72 / 108 of 144 visual tokens:
#   bash benchmarks/llava-small/run.sh      (about 22 min training, ~25 min evaluation, one core)
# The committed results used the current default model (stage 9); the method runs were stopped after five (README).
source "$(dirname "${BASH_SOURCE[0]}")/../shapes-data.sh"   # repo root, $B, the data
OUT=benchmarks/llava-small
$B init-llava --out runs/llava-small --qa data/shapes-qa --by-image data/shapes-qa/train/llava_conversations.json
$B train-llava --model runs/llava-small --data runs/llava-small/train_by_image.json --images data/shapes/images \
    --method none --trainable projector+lm --steps 150 --batch 32 --lr 3e-3 --threads 1 --max-minutes 22 --out runs/llava-small-train
M=runs/llava-small-train/model
Q=(--questions data/shapes-qa/test/llava_questions.jsonl --images data/shapes/images --annotations data/shapes-qa/test/annotations.json
   --batch 16 --max-new-tokens 3 --threads 1 --limit 1000)
$B eval llava-vqa --model $M "${Q[@]}" --json $OUT/none.json
for m in tome crossget fastv visionzip; do for k in 36 72 108; do
  $B eval llava-vqa --model $M "${Q[@]}" --method $m --keep $k --json $OUT/$m-$k.json
done; done
.venv/bin/python $OUT/table.py "$OUT"
