"""The parameter objects of the attention kernels: one small frozen dataclass per group of arguments.

    Visibility       which keys a query row sees: causal, window, key / prefix lengths, segment ids, a dense
                     mask, and the block map that summarises them per tile of block_m x block_n
    Bias             what is added to the scores: a dense bias, a Toeplitz table, and which of them needs a
                     gradient
    Dropout          in-kernel dropout of the probabilities: p and the seed
    AttentionParams  everything of ptm::attention but q, k, v: scale, Visibility, Bias, Dropout
    RelativeParams   what the query streams of relative attention share: key segment ids, scale, r_offset,
                     q_len, Dropout
    RelativeStream   one query stream of relative attention: q, the biases u and v_bias, the segment term, the
                     rows' segment ids and positions, its Visibility

Every layer passes these objects whole: the public ops build them (`AttentionMask.visibility()` gives the
Visibility), every backend takes them (reference_kernels.py, reference_relative.py, the Triton launchers
(triton/attention/launch.py, triton/relative_attention/launch.py), and the C++
kernels, whose mirror structs in csrc/cpu/kernel_params.h are filled from these objects by the pybind casters
in csrc/kernel_params_py.h). Only the torch.library custom ops carry them flat
(an op takes tensors and scalars): ops/_op_args.py derives that flat form from the fields below.

So a new argument is a field here (with a default that means "absent"), its mirror in kernel_params.h and
kernel_params_py.h, and the kernels that use it; no argument list elsewhere changes.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

from torch import Tensor

__all__ = ["Visibility", "Bias", "Dropout", "AttentionParams", "RelativeParams", "RelativeStream", "made", "replaced"]


def _params_class(cls: type) -> type:
    """`@dataclass(frozen=True, eq=False)` (eq=False: identity, never tensor ==) with an __init__ that stores all
    fields in one step. The dataclass's own __init__ of a frozen class calls object.__setattr__ once per field,
    about 0.3 µs each: 3 µs for a Visibility, and the attention ops build these objects on every call."""
    cls = dataclasses.dataclass(frozen=True, eq=False)(cls)
    fields = dataclasses.fields(cls)
    if hasattr(cls, "__post_init__") or any(f.default_factory is not dataclasses.MISSING or not f.init for f in fields):
        raise TypeError(f"{cls.__name__}: a parameter object takes plain fields (no default_factory, init=False or "
                        f"__post_init__)")
    scope = {f"_default_{f.name}": f.default for f in fields if f.default is not dataclasses.MISSING}
    params = ", ".join(f.name if f.default is dataclasses.MISSING else f"{f.name}=_default_{f.name}" for f in fields)
    stores = ", ".join(f"{f.name!r}: {f.name}" for f in fields)
    exec(f"def __init__(self, {params}):\n    self.__dict__.update({{{stores}}})\n", scope)
    init = scope["__init__"]
    init.__qualname__, init.__doc__ = f"{cls.__qualname__}.__init__", cls.__init__.__doc__
    cls.__init__ = init
    return cls


@_params_class
class Visibility:
    """Key j is visible to query row i iff every given part allows it (see reference_kernels.py for the exact
    rules). The analytic parts are evaluated at the row's position in key coordinates (i + Lk - Lq for
    attention), segment ids and the dense mask at the row itself."""

    causal: bool = False
    window_left: int = -1  # -1 = unbounded
    window_right: int = -1
    key_lengths: Optional[Tensor] = None  # int64 [B]
    prefix_lengths: Optional[Tensor] = None  # int64 [B]; comes with causal=True
    q_segments: Optional[Tensor] = None  # int64 [B, Lq]
    k_segments: Optional[Tensor] = None  # int64 [B, Lk]
    dense_mask: Optional[Tensor] = None  # bool, 4-D, broadcastable to [B, H, Lq, Lk]
    # Per tile of block_m x block_n: 0 nothing visible, 1 some, 2 all (AttentionMask.block_map); int8,
    # broadcastable to [B, H, ceil(Lq / block_m), ceil(Lk / block_n)]. A kernel of another tile ignores it.
    block_map: Optional[Tensor] = None
    block_m: int = 0
    block_n: int = 0

    def expanded(self, B: int, H: int, Lq: int, Lk: int) -> "Visibility":
        """The broadcast parts as views expanded to [B, H, ...] (stride 0, no copy): what the kernels take."""
        if self.dense_mask is None and self.block_map is None:
            return self
        return replaced(
            self, dense_mask=None if self.dense_mask is None else self.dense_mask.expand(B, H, Lq, Lk),
            block_map=None if self.block_map is None else self.block_map.expand(B, H, *self.block_map.shape[2:]))


@_params_class
class Bias:
    """Added to the scaled scores: dense[b, h, i, j] and toeplitz[h, i - j + Lk - 1]."""

    dense: Optional[Tensor] = None  # q's dtype or float32, 4-D broadcastable to [B, H, Lq, Lk]
    toeplitz: Optional[Tensor] = None  # float32 (float64 for float64 q) [H, Lq + Lk - 1]
    dense_requires_grad: bool = False  # whether the backward returns its gradient
    toeplitz_requires_grad: bool = False


@_params_class
class Dropout:
    """Dropout of the attention probabilities, drawn in the kernel (kept ones scaled by 1 / (1 - p))."""

    p: float = 0.0
    seed: Optional[Tensor] = None  # int64 scalar (a tensor, so that torch.compile draws it in the graph)

    @property
    def seed_value(self) -> int:
        """The seed as the kernels take it (0 without dropout)."""
        return 0 if self.seed is None else int(self.seed.item())


@_params_class
class AttentionParams:
    """ptm::attention's arguments besides q, k, v."""

    scale: float
    vis: Visibility = Visibility()
    bias: Bias = Bias()
    dropout: Dropout = Dropout()


@_params_class
class RelativeParams:
    """What the streams of relative / two-stream attention share besides k, v, r."""

    k_ids: Optional[Tensor]  # int64 [B, Lk], the keys' segment ids (with a stream's seg), or None
    scale: float
    r_offset: int  # the row of r holding relative distance 0
    q_len: int  # rows of the current segment (the query positions are 0 .. q_len - 1)
    dropout: Dropout = Dropout()  # the query stream of two-stream attention draws with seed + 1


@_params_class
class RelativeStream:
    """One query stream of relative attention (see reference_relative.py). The kernels score with q + u (content
    term) and q + v_bias (position term), `biased()`; the backward returns the gradients of q, u and v_bias, so
    that dq = d(q + u) + d(q + v_bias) needs one accumulator and q + u, q + v_bias are never saved."""

    q: Tensor  # [B, H, Lr, D]
    u: Optional[Tensor] = None  # [H, D]: the content bias (Transformer-XL r_w_bias), None for 0
    v_bias: Optional[Tensor] = None  # [H, D]: the position bias (r_r_bias), None for 0
    seg: Optional[Tensor] = None  # float32 [B, H, Lr, 2]: the segment term (same, other segment)
    q_ids: Optional[Tensor] = None  # int64 [B, Lr]: the rows' segment ids (with seg)
    positions: Optional[Tensor] = None  # int64 [B, Lr]: each row's position, None for 0 .. Lr - 1
    vis: Visibility = Visibility()

    def expanded(self, B: int, H: int, Lk: int) -> "RelativeStream":
        vis = self.vis.expanded(B, H, self.q.shape[2], Lk)
        return self if vis is self.vis else replaced(self, vis=vis)

    def biased(self) -> Tuple[Tensor, Tensor]:
        """(q + u, q + v_bias) in q's dtype, as the eager models form them (q itself where a bias is None); the
        kernels' inputs."""
        return _plus(self.q, self.u), _plus(self.q, self.v_bias)


def _plus(q: Tensor, bias: Optional[Tensor]) -> Tensor:
    return q if bias is None else (q + bias[None, :, None, :]).to(q.dtype)


def replaced(obj, **changes):
    """dataclasses.replace(obj, **changes) without running __init__ again: the ops do this on every call, and a
    frozen dataclass's __init__ costs about a microsecond (it checks nothing here)."""
    return made(type(obj), {**obj.__dict__, **changes})


def made(cls: type, fields: dict):
    """An instance of the parameter object `cls` with these fields, without __init__ (see `replaced`)."""
    obj = object.__new__(cls)
    obj.__dict__.update(fields)
    return obj
