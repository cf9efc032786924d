"""Round-to-nearest quantizers: integer grids, granularities, straight-through gradients, clip search."""

from __future__ import annotations

import pytest
import torch

from lsr.quant import QuantSpec, dequantize, fake_quantize, quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", ["channel", "group", "tensor"])
def test_codes_are_integers_on_the_grid_and_dequantize_back(bits, symmetric, granularity):
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity, group_size=16)
    x = torch.randn(8, 64) * torch.linspace(0.1, 10, 64)
    q, scale, zero = quantize(x, spec)
    assert torch.equal(q, q.round()) and q.min() >= spec.qmin and q.max() <= spec.qmax
    y = dequantize(q, scale, zero, x.shape)
    assert torch.equal(y, fake_quantize(x, spec))
    # round to nearest: the error is at most half a step everywhere (no clipping at clip_ratio 1)
    step = scale.expand_as(q).reshape(x.shape)
    assert ((y - x).abs() <= step / 2 + 1e-5).all()


def test_symmetric_int4_per_token_uses_absmax_over_7():
    x = torch.tensor([[7.0, -3.5, 0.49, 1.5]])
    q, scale, _ = quantize(x, QuantSpec(granularity="token"))
    assert scale.item() == 1.0
    assert q.tolist() == [[7.0, -4.0, 0.0, 2.0]]  # torch.round: half to even


def test_zero_rows_do_not_divide_by_zero():
    x = torch.zeros(3, 8)
    assert torch.equal(fake_quantize(x, QuantSpec()), x)


def test_straight_through_gradient():
    x = torch.randn(4, 32, requires_grad=True)
    fake_quantize(x, QuantSpec(granularity="token")).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_clip_search_lowers_weight_error():
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(0))
    plain = (fake_quantize(w, QuantSpec()) - w).pow(2).sum()
    searched = (fake_quantize(w, QuantSpec(clip_search=True)) - w).pow(2).sum()
    assert searched < 0.8 * plain


def test_clip_search_needs_a_symmetric_unclipped_spec():
    with pytest.raises(ValueError, match="clip_search"):
        QuantSpec(clip_search=True, symmetric=False)
    with pytest.raises(ValueError, match="group_size"):
        quantize(torch.randn(2, 10), QuantSpec(granularity="group", group_size=4))
