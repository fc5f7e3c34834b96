#!/bin/bash
# Issue 17's GPU measurement, one call on a lent device (not yet run: no device was lent so far).
# bfloat16, SDPA, stock vs ToMe vs CrossGET interleaved in one run per tower and batch, at ~50% of
# the tower's GFLOPs, with the matching share of the forward. From the repo root:
#   bash benchmarks/gpu-towers/run.sh        (OUT=benchmarks/gpu-towers by default)
set -e
OUT=${OUT:-benchmarks/gpu-towers}
cg() { python3 -c 'import sys; from crossget.tools.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
for model in clip-vit-b16 siglip-b16 dinov2-s14; do
  for batch in 64 256; do
    cg bench --model $model --tower vision --flops 0.5 --dtype bfloat16 --attn sdpa --device cuda \
      --batch $batch --rounds 10 --warmup 3 --threads 4 --out $OUT/$model-bs$batch
  done
done
