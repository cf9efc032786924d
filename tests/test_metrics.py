import math

import pytest
import torch
import torch.nn.functional as F

from lsr.metrics import LayerError, Perplexity, chunked_nll


def _reference_ppl(batches, ignore_index=-100):
    nll, n = 0.0, 0
    for logits, ids in batches:
        lg = logits[:, :-1].reshape(-1, logits.shape[-1]).double()
        tg = ids[:, 1:].reshape(-1)
        keep = tg != ignore_index
        nll += F.cross_entropy(lg[keep], tg[keep], reduction="sum").item()
        n += int(keep.sum())
    return math.exp(nll / n)


@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_perplexity_matches_reference(chunk):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(b, t, 50, generator=g) * 3, torch.randint(0, 50, (b, t), generator=g))
               for b, t in [(2, 9), (1, 17), (3, 5)]]
    m = Perplexity(chunk=chunk)
    for logits, ids in batches:
        m.update(logits, ids)
    assert m.token_count.item() == 2 * 8 + 16 + 3 * 4
    assert m.compute().item() == pytest.approx(_reference_ppl(batches), rel=1e-5)


def test_perplexity_uniform_logits_is_vocab_size():
    m = Perplexity()
    m.update(torch.zeros(2, 33, 128), torch.randint(0, 128, (2, 33)))
    assert m.compute().item() == pytest.approx(128.0, rel=1e-6)


def test_perplexity_unbatched_and_bf16():
    logits = torch.randn(12, 20)
    ids = torch.randint(0, 20, (12,))
    a, b = Perplexity(), Perplexity()
    a.update(logits, ids)
    b.update(logits[None].bfloat16(), ids[None])
    ref = _reference_ppl([(logits[None], ids[None])])
    assert a.compute().item() == pytest.approx(ref, rel=1e-5)
    assert b.compute().item() == pytest.approx(ref, rel=2e-2)


def test_perplexity_ignore_index():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 10, 30, generator=g)
    ids = torch.randint(0, 30, (2, 10), generator=g)
    masked = ids.clone()
    masked[0, 5:] = -100
    m = Perplexity()
    m.update(logits, masked)
    assert m.token_count.item() == 18 - 5
    assert m.compute().item() == pytest.approx(_reference_ppl([(logits, masked)]), rel=1e-5)
    # ignoring everything but one window matches scoring that window alone
    m2 = Perplexity()
    m2.update(logits[1:], ids[1:])
    masked[0] = -100
    m3 = Perplexity()
    m3.update(logits, masked)
    assert m3.compute().item() == pytest.approx(m2.compute().item(), rel=1e-6)


def test_chunked_nll_sum_and_count():
    logits = torch.randn(5, 3, 11)
    targets = torch.randint(0, 11, (5, 3))
    targets[0, 0] = -100
    total, count = chunked_nll(logits, targets, chunk=4)
    keep = targets != -100
    ref = F.cross_entropy(logits[keep].double(), targets[keep], reduction="sum")
    assert total.dtype == torch.float64 and count.item() == 14
    assert total.item() == pytest.approx(ref.item(), rel=1e-6)
    with pytest.raises(ValueError):
        chunked_nll(logits, targets[:, :2])


def test_perplexity_reset_and_bad_shape():
    m = Perplexity()
    m.update(torch.zeros(1, 4, 8), torch.zeros(1, 4, dtype=torch.long))
    m.reset()
    assert m.token_count.item() == 0 and m.nll_sum.item() == 0.0
    with pytest.raises(ValueError):
        m.update(torch.zeros(1, 4, 8), torch.zeros(1, 5, dtype=torch.long))


def test_layer_error():
    ref = torch.randn(2, 6, 16)
    m = LayerError()
    m.update(ref, ref.clone())
    assert m.compute().item() == 0.0
    m = LayerError()
    m.update(ref, 0.9 * ref)
    m.update(ref[0], 1.2 * ref[0])
    # 12 tokens at 0.01 and 6 tokens at 0.04
    assert m.count.item() == 18
    assert m.compute().item() == pytest.approx((12 * 0.01 + 6 * 0.04) / 18, rel=1e-5)
    with pytest.raises(ValueError):
        m.update(ref, ref[..., :8])
