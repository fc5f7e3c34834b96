#!/bin/bash
# Train-base recipes side by side on one GPU (one process each), then a 0.58-GFLOPs sweep of each.
# Usage, from the repo root: bash benchmarks/gpu-recipes/explore.sh benchmarks/gpu-recipes/round1.txt
# (a line per run: NAME train-base-arguments; seed 0 unless given). Generates the shapes data in 16
# processes if its images are missing. A line "@data DIR crossget-data-arguments" first makes another
# data set in DIR (all such lines at once); a run line then names it with "--data DIR/dataset_shapes.json",
# which its sweep uses too. OUT (default /tmp/out) gets summary.md and results.tgz.
JOBS_FILE=${1:?a jobs file}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
OUT=${OUT:-/tmp/out}; W=${WORK:-/tmp/gpu}; mkdir -p $OUT $W
DATA=${DATA:-data/shapes/dataset_shapes.json}; DEV=${DEV:-cuda}
cg() { python3 -c 'import sys; from crossget.tools.cli import main; sys.exit(main(sys.argv[1:]))' "$@"; }
python3 -c "import torch,transformers,accelerate;print(torch.__version__,transformers.__version__,accelerate.__version__,torch.cuda.is_available() and torch.cuda.get_device_name())"
t0=$(date +%s)
SIZES="--train ${NTRAIN:-8000} --val ${NVAL:-400} --test ${NTEST:-1000} --image-size 96"
if grep -v '^@data ' "$JOBS_FILE" | grep -q -v -e '--data ' -e '^\s*$'; then  # a run on the default data
  [ -d "$(dirname $DATA)/images" ] || cg data --out "$(dirname $DATA)" $SIZES --workers 16 || exit 1
fi
while read -r _ dir args; do
  cg data --out "$dir" $SIZES --workers 4 $args > /dev/null &
done < <(grep '^@data ' "$JOBS_FILE")
wait
echo "data ready after $(( $(date +%s) - t0 )) s"
names=()
while read -r name args; do
  [ -z "$name" ] || [ "$name" = "@data" ] && continue; names+=($name)
  data=$(grep -oP '(?<=--data )\S+' <<< "$args" || echo $DATA); args=$(sed -E 's/--data \S+//' <<< "$args")
  ( timeout ${TRAIN_TIMEOUT:-330} bash -c "$(declare -f cg); cg train-base --data $data --out $W/$name --threads 2 --max-minutes 4.5 $args" > $W/$name.train.log 2>&1
    echo "$name train rc=$? after $(( $(date +%s) - t0 )) s"
    timeout 90 bash -c "$(declare -f cg); cg eval sweep --model $W/$name --data $data --device $DEV --threads 2 --unguided --levels 0.58 --out $W/$name/sweep" > $W/$name.sweep.log 2>&1
    echo "$name sweep rc=$? after $(( $(date +%s) - t0 )) s" ) &
done < "$JOBS_FILE"
wait
python3 - "$W" "$OUT" "${names[@]}" <<'PY'
import json, sys, pathlib
W, OUT, names = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3:]
lines = []
for d in (W / n for n in names):
    lines.append(f"## {d.name}")
    t = d / "training.json"
    if t.exists():
        log = json.loads(t.read_text())
        keys = ("epochs", "lr", "train_seconds", "text_warmup_seconds", "text_warmup_loss_per_100_steps", "epoch_loss",
                "epoch_scene_loss", "epoch_text_scene_loss", "stopped_early_after_epoch")
        lines += [f"{k}: {log[k]}" for k in keys if k in log]
    s = d / "sweep" / "sweep.json"
    if s.exists():
        for r in json.loads(s.read_text())["results"]:
            tw = {v: round((r.get(f"twin_t2i_{v}", 0) + r.get(f"twin_i2t_{v}", 0)) / 2, 1)
                  for v in ("colour", "count", "move", "swap", "texture")}
            lines.append(f"{r['name']}: mean {r['mean_r1']:.1f} i2t {r['i2t_r1']:.1f} t2i {r['t2i_r1']:.1f} "
                         f"ratio {r['gflops_ratio']:.3f} fid {r['fidelity']:.3f} {tw}")
    lines.append("")
(OUT / "summary.md").write_text("\n".join(lines))
print("\n".join(lines))
PY
tar czf $OUT/results.tgz -C $W --exclude='*.safetensors' --exclude='*.png' "${names[@]/%/.train.log}" "${names[@]/%/.sweep.log}" "${names[@]}" 2>/dev/null
echo "total $(( $(date +%s) - t0 )) s"
