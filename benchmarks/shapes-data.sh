# Sourced by the shapes benchmarks' run.sh: go to the repository root, set $B (the CLI) and make the
# generated shapes data and its question files if they are missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
B=.venv/bin/crossget
[ -f data/shapes/dataset_shapes.json ] || $B data --out data/shapes --train 8000 --val 400 --test 1000 --image-size 96
[ -f data/shapes-qa/test/questions.json ] || $B data-qa --data data/shapes/dataset_shapes.json --out data/shapes-qa
