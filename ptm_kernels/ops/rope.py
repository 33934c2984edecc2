"""Rotary position embedding for q and k in one call: `ptm::rope`.

Layout [B, H, L, D] (SDPA's); any strides with a unit last-dimension stride are read without a copy, so a
`[B, L, H, D]` projection can be passed as `x.transpose(1, 2)`. The backward is the same rotation by minus
the angle (rotations are orthogonal), so it runs the same kernel.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import backend
from .. import _checks
from . import _fast_path


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool, rotary_dim: int,
            inverse: bool) -> Tensor:
    return backend.kernels("rope", x).rope_fwd(x, cos, sin, positions, interleaved, rotary_dim, inverse)


@_fast_path.custom_op("ptm::rope")
def _rope(q: Tensor, k: Optional[Tensor], cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool,
          rotary_dim: int, inverse: bool) -> Tuple[Tensor, Tensor]:
    q_out = _rotate(q, cos, sin, positions, interleaved, rotary_dim, inverse)
    k_out = _rotate(k, cos, sin, positions, interleaved, rotary_dim, inverse) if k is not None else q.new_empty(0)
    return q_out, k_out


@_rope.register_fake
def _(q, k, cos, sin, positions, interleaved, rotary_dim, inverse):
    return torch.empty_like(q), (torch.empty_like(k) if k is not None else q.new_empty(0))


def _rope_setup(ctx, inputs, output):
    q, k, cos, sin, positions, interleaved, rotary_dim, inverse = inputs
    ctx.args = (interleaved, rotary_dim, not inverse)
    ctx.has_k = k is not None
    ctx.save_for_backward(cos, sin, positions)


def _rope_grad(ctx, dq_out, dk_out):
    cos, sin, positions = ctx.saved_tensors
    dq_out = dq_out if dq_out.stride(-1) == 1 else dq_out.contiguous()
    dk = (dk_out if dk_out.stride(-1) == 1 else dk_out.contiguous()) if ctx.has_k else None
    dq, dk = _fast_path.call(_rope, dq_out, dk, cos, sin, positions, *ctx.args)
    return dq, (dk if ctx.has_k else None), None, None, None, None, None, None


_rope.register_autograd(_rope_grad, setup_context=_rope_setup)


def _positions(q: Tensor, max_positions: int, position_ids: Optional[Tensor], offset: Union[int, Tensor]) -> Tensor:
    B, L = q.shape[0], q.shape[2]
    if position_ids is not None:
        _checks.tensor("position_ids", position_ids, dtypes=(torch.int64, torch.int32, torch.int16, torch.uint8))
        if position_ids.dim() == 1:
            position_ids = position_ids.unsqueeze(0)
        if position_ids.dim() != 2 or position_ids.shape[1] != L or position_ids.shape[0] not in (1, B):
            raise ValueError(f"position_ids must have shape [{L}], [1, {L}] or [{B}, {L}] for q of shape "
                             f"{tuple(q.shape)}, got {tuple(position_ids.shape)}")
        _checks.same_device("q", q, position_ids=position_ids)
        pos = position_ids.to(torch.int64).contiguous()
    else:
        if isinstance(offset, Tensor):
            steps = torch.arange(L, device=q.device, dtype=torch.int64)
            _checks.tensor("offset", offset, dtypes=(torch.int64, torch.int32))
            if offset.dim() > 1 or (offset.dim() == 1 and offset.shape[0] not in (1, B)):
                raise ValueError(f"offset must be an int, a scalar tensor or a [{B}] tensor, got shape "
                                 f"{tuple(offset.shape)}")
            pos = (offset.to(device=q.device, dtype=torch.int64).reshape(-1, 1) + steps).contiguous()
        else:
            if offset < 0 or offset + L > max_positions:
                raise ValueError(f"positions offset..offset+L-1 = {offset}..{offset + L - 1} fall outside the "
                                 f"cos/sin cache of {max_positions} positions")
            return _steps(int(offset), L, q.device)
    # A user-given position must index the cache
    _checks.values_in("positions", pos, 0, max_positions, f"[0, {max_positions}) (the cos/sin cache)")
    return pos


def _steps(start: int, L: int, device: torch.device) -> Tensor:
    """[[start, ..., start + L - 1]] (int64 [1, L]), the cheapest way for a decode step's one position: arange and
    a view cost three times torch.full."""
    if L == 1:
        return torch.full((1, 1), start, dtype=torch.int64, device=device)
    return torch.arange(start, start + L, dtype=torch.int64, device=device).view(1, L)


def _unit_stride(t: Optional[Tensor]) -> Optional[Tensor]:
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def rope(q: Tensor, k: Optional[Tensor], cos: Tensor, sin: Tensor, *, position_ids: Optional[Tensor] = None,
         offset: Union[int, Tensor] = 0, interleaved: bool = False, rotary_dim: Optional[int] = None):
    """Rotate q [B, H, L, D] and k [B, Hk, L, D] (or None) by their positions; returns (q_rot, k_rot).

    cos, sin: [P, rotary_dim // 2] from `rope_cos_sin` / `nn.RotaryEmbedding`. Positions are `position_ids`
    ([L] or [B, L]), else `offset + arange(L)` (offset an int or a per-row [B] tensor: a KV cache's fill).
    `interleaved=False` is the rotate-half layout (LLaMA, GPT-NeoX), True the interleaved one (GPT-J, GLM).
    `rotary_dim < D` rotates only the first rotary_dim dimensions (GPT-J, GPT-NeoX partial rotary).
    """
    _checks.tensor("q", q, dim=4)
    B, _, L, D = q.shape
    if k is not None:
        _checks.tensor("k", k, dim=4)
        _checks.same_dtype("q", q, k=k)
        _checks.same_device("q", q, k=k)
        if (k.shape[0], k.shape[2], k.shape[3]) != (B, L, D):
            raise ValueError(f"k must have shape [{B}, Hk, {L}, {D}] to match q {tuple(q.shape)}, "
                             f"got {tuple(k.shape)}")
    R = D if rotary_dim is None else int(rotary_dim)
    if R <= 0 or R > D or R % 2:
        raise ValueError(f"rotary_dim must be even and in [2, {D}] (head dim), got {R}")
    for name, t in (("cos", cos), ("sin", sin)):
        _checks.tensor(name, t, dim=2)
        if t.shape[1] != R // 2:
            raise ValueError(f"{name} must have shape [max_positions, {R // 2}] (rotary_dim // 2), "
                             f"got {tuple(t.shape)}")
    _checks.shape("sin", sin, cos.shape)
    _checks.same_device("q", q, cos=cos, sin=sin)
    positions = _positions(q, cos.shape[0], position_ids, offset)

    cos32, sin32 = cos.float().contiguous(), sin.float().contiguous()
    q_out, k_out = _fast_path.call(_rope, _unit_stride(q), _unit_stride(k), cos32, sin32, positions,
                                   bool(interleaved), R, False)
    return (q_out, k_out) if k is not None else q_out


def rope_at_positions(q: Tensor, k: Optional[Tensor], cos: Tensor, sin: Tensor):
    """`rope` with the cos/sin rows of each token's own position, as transformers' rotary modules give them:
    cos, sin [B or 1, L, R // 2] (R = rotary_dim <= D, even; rotate-half layout) for q [B, H, L, D] and k
    [B, Hk, L, D] (or None). Row l of batch b (of batch 0 when 1) rotates position l of batch row b.

    The same kernel as `rope`, reading the given rows as its table: no position indexes anything outside it,
    so nothing is checked against a cache size, and nothing is synchronised (a decode step calls this once per
    layer)."""
    _checks.tensor("q", q, dim=4)
    B, _, L, D = q.shape
    for name, t in (("cos", cos), ("sin", sin)):
        _checks.tensor(name, t, dim=3)
    Bc, half = cos.shape[0], cos.shape[2]
    if cos.shape[1] != L or Bc not in (1, B) or not 0 < 2 * half <= D:
        raise ValueError(f"cos must have shape [{B} or 1, {L}, rotary_dim // 2 <= {D // 2}] for q of shape "
                         f"{tuple(q.shape)}, got {tuple(cos.shape)}")
    _checks.shape("sin", sin, cos.shape)
    if k is not None:
        _checks.tensor("k", k, dim=4)
        _checks.same_dtype("q", q, k=k)
        if (k.shape[0], k.shape[2], k.shape[3]) != (B, L, D):
            raise ValueError(f"k must have shape [{B}, Hk, {L}, {D}] to match q {tuple(q.shape)}, "
                             f"got {tuple(k.shape)}")
    _checks.same_device("q", q, k=k, cos=cos, sin=sin)
    positions = _steps(0, Bc * L, q.device)  # token l of batch row b reads row b * L + l of the [Bc * L, half] table
    if Bc > 1:
        positions = positions.view(Bc, L)
    table = lambda t: t.reshape(Bc * L, half).float().contiguous()  # noqa: E731
    q_out, k_out = _fast_path.call(_rope, _unit_stride(q), _unit_stride(k), table(cos), table(sin), positions, False,
                                   2 * half, False)
    return (q_out, k_out) if k is not None else q_out


# ------------------------------------------------------------------------------------- scaled frequencies
#
# transformers' rope_type variants (modeling_rope_utils.py), as the inverse frequencies [rotary_dim // 2] and the
# factor it multiplies cos and sin by ("attention_factor"). Computed in float32 as transformers does, so that the
# angles match its to the last bit. The cos/sin of given positions come from `rope_cos_sin_at`; pass them to
# `rope` with position_ids = arange(positions.numel()).view(positions.shape).

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def _default_inv_freq(rotary_dim: int, base) -> Tensor:
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))


def rope_frequencies(rotary_dim: int, rope_parameters: dict, max_position_embeddings: int,
                     seq_len: Optional[Tensor] = None) -> Tuple[Tensor, float]:
    """(inv_freq float32 [rotary_dim // 2], attention_factor) of a transformers `rope_parameters` dict
    (rope_type, rope_theta, and the type's own keys). "dynamic" (NTK) depends on the sequence: seq_len, a 0-dim
    tensor (max position + 1 of the call), raises the base once it exceeds max_position_embeddings."""
    kind = rope_parameters.get("rope_type", "default")
    base = rope_parameters.get("rope_theta", 10000.0)
    if kind not in ROPE_TYPES:
        raise NotImplementedError(f"rope_type {kind!r} (supported: {ROPE_TYPES})")
    if kind == "default":
        return _default_inv_freq(rotary_dim, base), 1.0
    factor = rope_parameters.get("factor")
    if kind == "linear":
        return _default_inv_freq(rotary_dim, base) / factor, 1.0
    if kind == "dynamic":
        if seq_len is None:
            return _default_inv_freq(rotary_dim, base * 1.0), 1.0
        seq = torch.maximum(seq_len, torch.tensor(max_position_embeddings, dtype=seq_len.dtype, device=seq_len.device))
        base = base * ((factor * seq / max_position_embeddings) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
        return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device=seq.device).float()
                               / rotary_dim)), 1.0
    original = rope_parameters.get("original_max_position_embeddings", max_position_embeddings)
    if kind == "llama3":
        inv_freq = _default_inv_freq(rotary_dim, base)
        low, high = rope_parameters["low_freq_factor"], rope_parameters["high_freq_factor"]
        low_wavelen, high_wavelen = original / low, original / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)  # long wavelengths: interpolated
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn: interpolation for long wavelengths, extrapolation for short ones, a linear ramp between
    if factor is None:
        factor = max_position_embeddings / original
    attention_factor = rope_parameters.get("attention_factor")
    mscale, mscale_all_dim = rope_parameters.get("mscale"), rope_parameters.get("mscale_all_dim")

    def get_mscale(scale, m=1):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        attention_factor = (float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
                            if mscale and mscale_all_dim else get_mscale(factor))
    beta_fast = rope_parameters.get("beta_fast") or 32
    beta_slow = rope_parameters.get("beta_slow") or 1

    def correction_dim(rotations):
        return (rotary_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope_parameters.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    pos_freqs = base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = 1.0 / (factor * pos_freqs) * (1 - extrapolation) + 1.0 / pos_freqs * extrapolation
    return inv_freq, attention_factor


def rope_cos_sin_at(inv_freq: Tensor, positions: Tensor, attention_factor: float = 1.0) -> Tuple[Tensor, Tensor]:
    """cos and sin [positions.numel(), len(inv_freq)] (float32) of the angles position * inv_freq, times
    attention_factor: the table `rope` reads at position_ids = arange(positions.numel()).view(positions.shape)."""
    angles = positions.reshape(-1, 1).float() * inv_freq.to(positions.device)
    cos, sin = angles.cos(), angles.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos, sin
