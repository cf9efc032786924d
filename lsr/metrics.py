"""Metrics: perplexity of causal LM logits and relative output error of a layer."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric


def chunked_nll(
    logits: Tensor, targets: Tensor, chunk: int = 1024, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy (float64) and count of non-ignored targets, ``chunk`` rows at a time.

    ``logits`` is ``[..., V]`` and ``targets`` the matching ``[...]`` class ids; each chunk is upcast to
    float32, so the full-vocabulary softmax is never materialised for all rows at once.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    logits = logits.reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1).long()
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for i in range(0, targets.numel(), chunk):
        nll = F.cross_entropy(
            logits[i : i + chunk].float(), targets[i : i + chunk], ignore_index=ignore_index, reduction="sum"
        )
        total += nll.double()
    return total, (targets != ignore_index).sum()


class Perplexity(Metric):
    """Token-level perplexity ``exp(sum NLL / tokens)`` of causal LM logits.

    ``update(logits [B, T, V], input_ids [B, T])`` scores tokens 1..T-1 of each window: ``logits[:, :-1]``
    predict ``input_ids[:, 1:]`` (the shift is done here). Targets equal to ``ignore_index`` are skipped.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, ignore_index: int = -100, chunk: int = 1024, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.chunk = chunk
        self.add_state("nll_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("token_count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, input_ids: Tensor) -> None:
        if logits.dim() == 2:  # a single unbatched window
            logits, input_ids = logits[None], input_ids[None]
        if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
            raise ValueError(f"expected logits [B, T, V] and ids [B, T], got {tuple(logits.shape)}, "
                             f"{tuple(input_ids.shape)}")
        nll, count = chunked_nll(logits[:, :-1], input_ids[:, 1:], self.chunk, self.ignore_index)
        self.nll_sum += nll
        self.token_count += count

    def compute(self) -> Tensor:
        """``exp(nll_sum / token_count)`` (NaN before any scored token)."""
        return torch.exp(self.nll_sum / self.token_count).float()


class LayerError(Metric):
    """Mean over tokens of the relative output error ``||ref - approx||^2 / ||ref||^2`` (last dim)."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, eps: float = 1e-12, **kwargs) -> None:
        super().__init__(**kwargs)
        self.eps = eps
        self.add_state("err_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, ref: Tensor, approx: Tensor) -> None:
        if ref.shape != approx.shape:
            raise ValueError(f"shape mismatch: ref {tuple(ref.shape)} vs approx {tuple(approx.shape)}")
        ref = ref.reshape(-1, ref.shape[-1]).float()
        approx = approx.reshape(-1, approx.shape[-1]).float()
        err = (ref - approx).pow(2).sum(-1) / ref.pow(2).sum(-1).clamp_min(self.eps)
        self.err_sum += err.double().sum()
        self.count += err.numel()

    def compute(self) -> Tensor:
        """Mean per-token relative error."""
        return (self.err_sum / self.count).float()


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, *, batch_size: int = 1, device: str | torch.device | None = None,
               log: Callable[[str], None] | None = None, label: str = "perplexity") -> float:
    """Token perplexity of `model` over ``[n, seq_len]`` windows; with `log`, a progress line every ~15 s."""
    if device is None:
        device = next(t for t in (*model.parameters(), *model.buffers()) if not t.is_meta).device
    metric = Perplexity().to(device)
    start = last = time.perf_counter()
    done = 0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        metric.update(model(batch).logits, batch)
        done += batch.shape[0]
        if log is not None and time.perf_counter() - last > 15:
            last = time.perf_counter()
            log(f"{label}: {done}/{windows.shape[0]} windows, {float(metric.compute()):.3f} so far "
                f"({last - start:.0f}s)")
    return float(metric.compute())
