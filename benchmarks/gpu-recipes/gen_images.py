"""Render the images of an existing dataset_shapes.json in parallel (same code path and rng stream
as crossget.data.shapes.generate_dataset), checking each scene and caption against the JSON.

Usage: python gen_images.py data/shapes/dataset_shapes.json WORKERS. Assumes the settings of
`crossget data --image-size 96` (seed 0, families of 3, 2-3 entities)."""
import json, sys
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

from PIL import Image
from crossget.data.shapes import SPLITS, _family_rng, make_captions, render_scene, sample_family

ANN = Path(sys.argv[1]); WORKERS = int(sys.argv[2])
SIZE = 96


def job(args):
    split, index, entries = args
    rng = _family_rng(0, split, index)
    family = sample_family(rng, 3, (2, 3))[: len(entries)]
    scenes = [s for s, _ in family]
    for k, ((scene, variant), e) in enumerate(zip(family, entries)):
        assert [asdict(x) for x in scene] == e["objects"] and variant == e["variant"], (split, index, k)
        img = render_scene(scene, SIZE, rng, 4.0, 4)
        raws = make_captions(scene, scenes[:k] + scenes[k + 1:], rng, 5)
        assert raws == [s["raw"] for s in e["sentences"]], (split, index, k)
        Image.fromarray(img).save(ANN.parent / "images" / e["filename"])
    return len(entries)


if __name__ == "__main__":
    images = json.loads(ANN.read_text())["images"]
    (ANN.parent / "images").mkdir(exist_ok=True)
    fams = defaultdict(list)
    for e in images:
        fams[(e["split"], e["family"])].append(e)
    first = {}
    jobs = []
    for (split, fam), entries in fams.items():
        first.setdefault(split, fam)
        jobs.append((split, fam - first[split], entries))
    with ProcessPoolExecutor(WORKERS) as ex:
        n = sum(ex.map(job, jobs, chunksize=16))
    print(f"rendered {n} images ({len(jobs)} families)")
