"""crossget.flops: CPU SDPA is counted, eager and sdpa agree, merging lowers the count."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import flop_registry

import crossget
from crossget.flops import count_flops, model_gflops
from crossget.tools.bench import make_inputs
from crossget.tools.zoo import load_model


def test_cpu_sdpa_formula_is_registered():
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu in flop_registry
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward in flop_registry


def test_matmul_count_is_exact():
    a, b = torch.randn(3, 5), torch.randn(5, 7)
    assert count_flops(torch.matmul, a, b) == 2 * 3 * 5 * 7


def test_sdpa_forward_and_backward_counts():
    b, h, n, d = 2, 3, 5, 4
    q = torch.randn(b, h, n, d)
    assert count_flops(F.scaled_dot_product_attention, q, q, q) == 4 * b * h * n * n * d  # QK^T and PV

    x = q.clone().requires_grad_()

    def fwd_bwd():
        F.scaled_dot_product_attention(x, x, x).sum().backward()

    assert count_flops(fwd_bwd) == (4 + 10) * b * h * n * n * d  # backward: 5 matmuls


@pytest.mark.parametrize("tower", ["vision", "both"])
def test_sdpa_and_eager_models_count_the_same(tower):
    model = load_model("clip-tiny", tower)
    inputs = make_inputs(model, tower, batch=2)
    counts = {}
    for impl in ("sdpa", "eager"):
        model.set_attn_implementation(impl)
        counts[impl] = model_gflops(model, inputs)
    assert counts["sdpa"] > 0
    assert counts["sdpa"] == pytest.approx(counts["eager"], rel=0.02)


def test_per_sample_divides_by_batch():
    model = load_model("clip-tiny", "vision")
    one = model_gflops(model, make_inputs(model, "vision", batch=1))
    assert model_gflops(model, make_inputs(model, "vision", batch=3), per_sample=True) == pytest.approx(one)
    assert model_gflops(model, make_inputs(model, "vision", batch=3)) == pytest.approx(3 * one)


@pytest.mark.parametrize("method", ["tome", "crossget"])
def test_counts_drop_when_tokens_are_reduced(method):
    model = load_model("clip-tiny", "vision")
    inputs = make_inputs(model, "vision", batch=2)
    stock = model_gflops(model, inputs)
    counts = []
    for r in (1, 3, 6):
        crossget.patch(model, r=r, method=method)
        counts.append(model_gflops(model, inputs))
    crossget.unpatch(model)
    assert counts[0] > counts[1] > counts[2]
    assert counts[2] < stock
    assert model_gflops(model, inputs) == stock
