"""GPTQ: weight quantization with second-order error feedback (Frantar et al., 2022).

Columns of ``W[out, in]`` are quantized one at a time; the error of each column is spread over the columns not yet
quantized through the inverse Hessian ``H⁻¹`` of the layer's squared output error, ``H = 2/n Σ xᵀx`` over the
inputs the weight really multiplies (for a `QLinear`, ``prepare_input(x)``). The quantization grid is the one of
`lsr.quant.rtn` (same `QuantSpec`, same formulas), and the result comes back in exactly the layout
`lsr.quant.rtn.quantize` returns, so `dequantize` and the INT4 exporter take it unchanged.

Scales:

* ``channel`` / ``token`` (one scale per output row) and ``tensor``: computed once, before the sweep, from the
  whole weight (after zeroing dead columns), exactly as RTN does (``clip_ratio`` included).
* ``group``: computed per group from the current (error-updated) weights when the sweep reaches the group's first
  column — standard GPTQ with groups. With ``act_order`` the sweep visits columns out of order, so the scales are
  instead computed up front from the original weight per contiguous group ("static groups"): the group/scale layout
  stays the simple contiguous one of RTN, at no cost in the exporter.

GPTAQ (asymmetric calibration, towards the float model's outputs) is plain GPTQ of a corrected weight: see
`asymmetric_target` and `CrossAccumulator`; `gptq_quantize` itself is unchanged.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from lsr.quant.rtn import QuantSpec, dequantize, quantize

__all__ = ["CrossAccumulator", "HessianAccumulator", "asymmetric_target", "gptq_fake_quantize", "gptq_quantize"]

_CHOLESKY_RETRIES = 3


class HessianAccumulator:
    """Running ``H = 2/n Σ xᵀx`` (float64) over all tokens passed to `add`, as GPTQ collects it."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        if in_features < 1:
            raise ValueError(f"in_features must be positive, got {in_features}")
        self.in_features = in_features
        self._hessian = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.nsamples = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Accumulate the tokens of `x[..., in_features]` (every leading dimension counts as tokens)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with last dimension {self.in_features}, got shape {tuple(x.shape)}")
        x = x.detach().reshape(-1, self.in_features).to(device=self._hessian.device, dtype=torch.float64)
        n = x.shape[0]
        if n == 0:
            return
        total = self.nsamples + n
        self._hessian *= self.nsamples / total
        x = x * (2.0 / total) ** 0.5
        self._hessian += x.T @ x
        self.nsamples = total

    @property
    def hessian(self) -> torch.Tensor:
        """The accumulated Hessian ``[in, in]`` (float64; zeros before any `add`)."""
        return self._hessian


class CrossAccumulator:
    """Running cross term ``D = 2/n Σ (x − x̃)ᵀ x̃`` (float64) of GPTAQ, normalised like `HessianAccumulator`.

    `add` takes the same tokens twice: ``x_q`` as the quantized model feeds the layer (``x̃``, the tokens of the
    Hessian) and ``x_fp`` as the float model feeds it (``x``). ``D[i, j] = 2/n Σ_t Δx_ti x̃_tj`` with ``Δx = x − x̃``
    (``ΔX X̃ᵀ`` with tokens as columns).
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        if in_features < 1:
            raise ValueError(f"in_features must be positive, got {in_features}")
        self.in_features = in_features
        self._cross = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.nsamples = 0

    @torch.no_grad()
    def add(self, x_q: torch.Tensor, x_fp: torch.Tensor) -> None:
        """Accumulate the tokens of `x_q` and `x_fp` (same shape ``[..., in_features]``, token by token)."""
        if x_q.shape != x_fp.shape:
            raise ValueError(f"quantized and float inputs must have the same shape, got {tuple(x_q.shape)} and "
                             f"{tuple(x_fp.shape)}")
        if x_q.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with last dimension {self.in_features}, got shape {tuple(x_q.shape)}")
        as64 = dict(device=self._cross.device, dtype=torch.float64)
        x_q = x_q.detach().reshape(-1, self.in_features).to(**as64)
        n = x_q.shape[0]
        if n == 0:
            return
        delta = x_fp.detach().reshape(-1, self.in_features).to(**as64) - x_q
        total = self.nsamples + n
        self._cross *= self.nsamples / total
        self._cross += (2.0 / total) * (delta.T @ x_q)
        self.nsamples = total

    @property
    def cross(self) -> torch.Tensor:
        """The accumulated ``D`` ``[in, in]`` (float64; zeros before any `add`)."""
        return self._cross


@torch.no_grad()
def asymmetric_target(
    weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, *, alpha: float = 1.0, damp: float = 0.01,
) -> torch.Tensor:
    """GPTAQ's target: the weight ``W*`` such that plain GPTQ of ``W*`` on ``H̃`` is GPTQ of the asymmetric objective.

    GPTAQ (Li et al., 2025, "GPTQv2") quantizes ``W`` to minimise ``‖Q X̃ − W X‖²``: ``X̃`` the layer's inputs in
    the quantized model (the Hessian's tokens), ``X`` its inputs in the float model. With ``H̃ = X̃X̃ᵀ`` and
    ``D = (X − X̃)X̃ᵀ`` (`HessianAccumulator`, `CrossAccumulator`, the same 2/n normalisation) and GPTQ's damping
    ``H_λ = H̃ + λI``, ``λ = damp · mean diag H̃`` (the `gptq_quantize` damping, dead inputs' diagonal set to 1 as
    there), the damped objective is, for every row, ``(q − w*) H_λ (q − w*)ᵀ`` plus a constant, with

        ``W* = W + α · W D H_λ⁻¹``   (α = 1: the exact minimiser; W* solves ``W* H_λ = W H_λ + α W D``).

    So ``gptq_quantize(W*, H̃)`` is GPTQ's greedy column sweep on the true asymmetric objective: after each column
    the remaining ones are the exact minimiser given the columns already fixed. ``alpha`` scales ``X − X̃`` (the
    target becomes ``W (X̃ + α(X − X̃))``): 0 is plain GPTQ, 1 the exact objective.

    GPTAQ's reference code (default α = 0.25, an empirical choice) instead adds ``w_i · P[i, i:]`` to the remaining
    columns inside the sweep, ``P = α · triu₁(D Uᵀ) U`` with ``UᵀU = H_λ⁻¹`` (U upper, GPTQ's factor) and ``triu₁``
    the strictly upper triangle. Unmasked and with the original ``w``, ``W P`` would be this correction ``W D H_λ⁻¹``;
    the mask keeps only each column's asymmetry that the columns after it can absorb (the terms on and below the
    diagonal, among them most of the white activation-quantization noise, are dropped, the last column's asymmetry is
    never compensated), and it multiplies the unrounded column within a lazy block but the rounded one across blocks.
    It is therefore not equivalent (on random layers, 32 tokens per input, X̃ = X + noise + drift, the column-wise α = 1
    removed about a tenth of plain GPTQ's asymmetric error, this closed form about 40 %, and more than the column-wise
    one at every α). This closed form is exact, costs one Cholesky solve ``[in, in]`` per layer, and leaves the sweep
    (groups, act_order, block size) untouched.

    Returns ``W*`` in float32, on `weight`'s device. With ``D = 0`` or ``alpha = 0`` it is `weight` itself (as
    float32), so the codes are plain GPTQ's.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    cols = weight.shape[1]
    for name, matrix in (("hessian", hessian), ("cross", cross)):
        if matrix.shape != (cols, cols):
            raise ValueError(f"{name} must be [{cols}, {cols}] for a weight {tuple(weight.shape)}, "
                             f"got {tuple(matrix.shape)}")
        if not torch.isfinite(matrix).all():
            raise ValueError(f"{name} has non-finite entries")
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if not damp > 0:
        raise ValueError(f"damp must be positive, got {damp}")
    W = weight.detach().float()
    if alpha == 0 or not cross.any():
        return W.clone()
    device = weight.device
    H = hessian.detach().to(device=device, dtype=torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    eye = torch.eye(cols, dtype=H.dtype, device=device)
    for attempt in range(_CHOLESKY_RETRIES + 1):  # damping x10 on failure, as gptq_quantize does
        lower, info = torch.linalg.cholesky_ex(H + (damp * 10**attempt) * torch.diag(H).mean() * eye)
        if info.item() == 0:
            break
    else:
        raise ValueError(f"GPTAQ: Cholesky of the damped Hessian {tuple(H.shape)} failed for the weight "
                         f"{tuple(weight.shape)}; is the Hessian positive semi-definite?")
    W64 = W.double()
    rhs = W64 @ cross.detach().to(device=device, dtype=torch.float64)  # W D, rows of the right-hand side
    correction = torch.cholesky_solve(rhs.T, lower).T  # (H_λ⁻¹ (W D)ᵀ)ᵀ = W D H_λ⁻¹ (H_λ symmetric)
    return (W64 + alpha * correction).float()


def _params(w: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RTN scale and zero point of each row of `w` (as `[rows, 1]`), computed with `spec`'s formulas."""
    _, scale, zero = quantize(w, replace(spec, granularity="channel"), clip)
    return scale, zero


def _inverse_cholesky(hessian: torch.Tensor, damp: float, weight_shape: torch.Size) -> torch.Tensor:
    """Upper Cholesky factor of the damped ``H⁻¹`` (float64), damping ×10 on failure."""
    mean_diag = torch.diag(hessian).mean()
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for attempt in range(_CHOLESKY_RETRIES + 1):
        damped = hessian + (damp * 10**attempt) * mean_diag * eye
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() != 0:
            continue
        inverse = torch.cholesky_inverse(lower)
        upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
        if info.item() == 0 and torch.isfinite(upper).all():
            return upper
    raise ValueError(
        f"GPTQ: Cholesky of the damped Hessian {tuple(hessian.shape)} failed for the weight {tuple(weight_shape)} "
        f"even with damping {damp * 10**_CHOLESKY_RETRIES:g}·mean(diag H); is the Hessian positive semi-definite?"
    )


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: QuantSpec,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    clip: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ-quantize ``weight[out, in]`` given the input Hessian ``[in, in]``.

    Returns ``(q, scale, zero)`` in the layout of ``lsr.quant.rtn.quantize(weight, spec)`` (integer-valued float32
    codes in grouped shape; float32 scale / zero per row, group or tensor; zero is None if symmetric), on the
    weight's device, so ``dequantize(q, scale, zero, weight.shape)`` is the quantized weight.

    `damp` is the relative diagonal damping (× mean diag H); `act_order` sweeps columns by descending diag H (with
    static groups for group granularity, see the module docstring); `block_size` is the lazy-batch width (rounded
    to a multiple of the group size for dynamic groups — the result does not depend on it beyond float rounding).
    Dead inputs (``H_ii == 0``) get a zero weight column. `clip`: per-row clip ratios ``[out, 1]`` (learned weight
    clips) fixing the scales ``clip · max|w_row| / qmax`` instead of the spec's clip (channel granularity only).
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian must be [{cols}, {cols}] for a weight {tuple(weight.shape)}, "
                         f"got {tuple(hessian.shape)}")
    if not damp > 0:
        raise ValueError(f"damp must be positive, got {damp}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if not torch.isfinite(hessian).all():
        raise ValueError("hessian has non-finite entries")
    if not torch.isfinite(weight).all():
        raise ValueError("weight has non-finite entries")
    grouped = spec.granularity == "group"
    gs = spec.group_size
    if clip is not None and spec.granularity not in ("channel", "token"):
        raise ValueError(f"a per-row clip needs one scale per output row, got granularity {spec.granularity!r}")
    if grouped and cols % gs:
        raise ValueError(f"last dimension {cols} is not a multiple of group_size {gs}")

    device = weight.device
    W = weight.detach().to(dtype=torch.float32).clone()
    H = hessian.detach().to(device=device, dtype=torch.float64).clone()

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    # Scales fixed before the sweep (everything except dynamic groups), in original column order.
    dynamic_groups = grouped and not act_order
    if grouped:
        n_groups = cols // gs
        scale_g = torch.empty(rows, n_groups, dtype=torch.float32, device=device)
        zero_g = None if spec.symmetric else torch.empty_like(scale_g)
        if not dynamic_groups:
            s, z = _params(W.reshape(rows * n_groups, gs), spec)
            scale_g.copy_(s.reshape(rows, n_groups))
            if zero_g is not None:
                zero_g.copy_(z.reshape(rows, n_groups))
    elif spec.granularity == "tensor":
        _, s, z = quantize(W, spec)
        scale_full = s.expand(rows, 1)
        zero_full = None if z is None else z.expand(rows, 1)
    else:  # channel / token: one scale per output row
        scale_full, zero_full = _params(W, spec, clip)

    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else None
    if perm is not None:
        W = W[:, perm]
        H = H[perm][:, perm]
    order = perm if perm is not None else torch.arange(cols, device=device)
    group_of = (order // gs).tolist() if grouped else None

    Hinv = _inverse_cholesky(H, damp, weight.shape).to(torch.float32)
    del H

    if dynamic_groups:
        block_size = max(gs, block_size // gs * gs)  # a group never straddles two blocks
    Q = torch.zeros_like(W)  # integer codes, sweep order
    qmin, qmax = spec.qmin, spec.qmax
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if grouped:
                g = group_of[col]
                if dynamic_groups and col % gs == 0:
                    s, z = _params(W1[:, i : i + gs], spec)
                    scale_g[:, g] = s[:, 0]
                    if zero_g is not None:
                        zero_g[:, g] = z[:, 0]
                sc = scale_g[:, g]
                zc = None if zero_g is None else zero_g[:, g]
            else:
                sc = scale_full[:, 0]
                zc = None if zero_full is None else zero_full[:, 0]
            w = W1[:, i]
            if zc is None:
                q = torch.clamp(torch.round(w / sc), qmin, qmax)
                deq = q * sc
            else:
                q = torch.clamp(torch.round(w / sc) + zc, qmin, qmax)
                deq = (q - zc) * sc
            Q1[:, i] = q
            err = (w - deq) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]

    if grouped:
        q_out = Q.reshape(rows, cols // gs, gs)
        scale_out = scale_g.unsqueeze(-1)
        zero_out = None if zero_g is None else zero_g.unsqueeze(-1)
    elif spec.granularity == "tensor":
        q_out, scale_out = Q.reshape(1, -1), scale_full[:1].contiguous()
        zero_out = None if zero_full is None else zero_full[:1].contiguous()
    else:
        q_out, scale_out, zero_out = Q, scale_full, zero_full
    return q_out, scale_out, zero_out


def gptq_fake_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, **kwargs) -> torch.Tensor:
    """The GPTQ-quantized weight, dequantized, in `weight`'s dtype (keywords as for `gptq_quantize`)."""
    q, scale, zero = gptq_quantize(weight, hessian, spec, **kwargs)
    return dequantize(q, scale, zero, weight.shape).to(weight.dtype)
