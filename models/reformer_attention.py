"""Reformer's two attentions (Kitaev et al., 2020; transformers' reformer), on the fused attention op.

Both attend within chunks of `chunk` positions: each chunk's queries see the keys of their own chunk and of
`before` / `after` neighbouring chunks, rolled around the ends as transformers does (chunk 0's previous chunk is
the last one; a causal model hides those keys anyway).

    LocalAttention  separate q / k / v projections, chunks in sequence order.
    LSHAttention    one shared q = k projection; the keys are the queries length-normalised. Positions are hashed
                    into buckets by random rotations (`num_hashes` rounds), sorted by bucket, and chunked in that
                    order, so similar vectors land in the same chunk. A query never attends to its own position
                    unless nothing else is visible (its score takes -1e5). The rounds' outputs are combined by
                    the softmax of their log-sum-exps.

Chunked, a sequence is a batch of [chunk, (before + 1 + after) * chunk] attentions: q / k / v become [B, H * n, chunk,
D] for n chunks and run through ptm_kernels.attention with a dense visibility mask (causal by original position,
key padding) and, for LSH, a bias of -1e5 at the query's own position. transformers writes -1e9 into hidden
scores where this masks them; the two agree for every row that sees a key, which every row does: a query sees
its own position (LSH: at -1e5; local: causal or not, a real query's own key is not padding).

The rounds are combined with the op's log-sum-exp, which carries no gradient; where a gradient must flow
through it (num_hashes > 1 while autograd records), the chunks' attention runs in plain torch instead.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptm_kernels import AttentionMask, attention
from ptm_kernels.ops.attention import MAX_HEAD_DIM, MIN_HEAD_DIM

SELF_SCORE = {torch.float16: -1e3}  # transformers' score at a query's own position, -1e5 in other dtypes


def roll_chunks(x: Tensor, before: int, after: int) -> Tensor:
    """[B, H, n, c, ...] -> [B, H, n, (before + 1 + after) * c, ...]: each chunk beside its neighbours, rolled
    around the ends (transformers' _look_adjacent)."""
    if before == 0 and after == 0:
        return x
    return torch.cat([torch.roll(x, shifts=-i, dims=2) for i in range(-before, after + 1)], dim=3)


def attend_chunks(q: Tensor, k: Tensor, v: Tensor, visible: Tensor, self_bias: Optional[Tensor], dropout_p: float,
                  lse_grad: bool) -> Tuple[Tensor, Tensor]:
    """softmax(q k^T + self_bias, hidden where not visible) v per chunk: q [B, H, n, c, D], k / v [B, H, n, m, D],
    visible / self_bias [B, H, n, c, m] -> (out [B, H, n, c, D], lse [B, H, n, c]). q is already scaled.
    lse_grad: the log-sum-exp must carry a gradient (plain torch); else the fused op, for the head dims it takes."""
    B, H, n, c, D = q.shape
    m = k.shape[3]
    if lse_grad or not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        scores = q @ k.transpose(-1, -2)
        if self_bias is not None:
            scores = scores + self_bias
        scores = scores.masked_fill(~visible, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        probs = F.dropout(torch.exp(scores - lse[..., None]), dropout_p, training=dropout_p > 0)
        return probs @ v, lse
    mask = AttentionMask.dense(visible.reshape(B, H * n, c, m))
    if self_bias is not None:
        mask = mask & AttentionMask.bias(self_bias.reshape(B, H * n, c, m))
    out, lse = attention(q.reshape(B, H * n, c, D), k.reshape(B, H * n, m, D), v.reshape(B, H * n, m, D), mask,
                         scale=1.0, dropout_p=dropout_p, return_lse=True)
    return out.reshape(B, H, n, c, D), lse.reshape(B, H, n, c)


def visibility(q_pos: Tensor, k_pos: Tensor, key_ok: Optional[Tensor], causal: bool) -> Optional[Tensor]:
    """[..., c, m] bool: key position k_pos visible from query position q_pos ([..., c] / [..., m]); key_ok
    [B, L] (1 = token) read at the key positions, whose leading dimension is B."""
    vis = None
    if key_ok is not None:
        flat = k_pos.reshape(k_pos.shape[0], math.prod(k_pos.shape[1:]))  # (B may be 0)
        vis = key_ok.bool().gather(1, flat).view(k_pos.shape)[..., None, :].expand(*q_pos.shape, k_pos.shape[-1])
    if causal:
        c = q_pos[..., :, None] >= k_pos[..., None, :]
        vis = c if vis is None else vis & c
    return vis


class LocalAttention(nn.Module):
    """transformers' LocalSelfAttention: q / k / v projections (no bias), attention within chunks of
    local_attn_chunk_length positions and their local_num_chunks_before / _after neighbours (all positions when
    the sequence fits one chunk). c: the model's config (reformer.ReformerConfig)."""

    def __init__(self, c):
        super().__init__()
        self.heads, self.head_dim, self.causal = c.num_attention_heads, c.attention_head_size, c.is_decoder
        self.chunk, self.before, self.after = c.local_attn_chunk_length, c.local_num_chunks_before, \
            c.local_num_chunks_after
        self.dropout = c.local_attention_probs_dropout_prob
        self.query, self.key, self.value = (nn.Linear(c.hidden_size, self.heads * self.head_dim, bias=False)
                                            for _ in range(3))

    def forward(self, x: Tensor, key_ok: Optional[Tensor]) -> Tensor:
        B, L, _ = x.shape
        H, D = self.heads, self.head_dim
        q, k, v = (p(x).view(B, L, H, D).transpose(1, 2) for p in (self.query, self.key, self.value))
        k = k / math.sqrt(D)
        pos = torch.arange(L, device=x.device).expand(B, H, L)
        n, c = (1, L) if L <= self.chunk else (L // self.chunk, self.chunk)
        before, after = (0, 0) if n == 1 else (self.before, self.after)
        q, k, v, q_pos = (t.reshape(B, H, n, c, *t.shape[3:]) for t in (q, k, v, pos))
        k, v, k_pos = (roll_chunks(t, before, after) for t in (k, v, q_pos))
        vis = visibility(q_pos, k_pos, key_ok, self.causal)
        if vis is None:
            vis = torch.ones(*q_pos.shape, k_pos.shape[-1], dtype=torch.bool, device=x.device)
        out, _ = attend_chunks(q, k, v, vis, None, self.dropout if self.training else 0.0, lse_grad=False)
        return out.reshape(B, H, L, D).transpose(1, 2).reshape(B, L, H * D)


class LSHAttention(nn.Module):
    """transformers' LSHSelfAttention (see the module docstring). c: the model's config (reformer.ReformerConfig):
    lsh_attn_chunk_length, lsh_num_chunks_before / _after, num_hashes, hash_seed, and num_buckets: an int, a tuple
    of factors (their product, hashed factor by factor), or None: chosen from the first sequence's length, as
    transformers does."""

    def __init__(self, c):
        super().__init__()
        self.heads, self.head_dim, self.causal = c.num_attention_heads, c.attention_head_size, c.is_decoder
        self.chunk, self.before, self.after = c.lsh_attn_chunk_length, c.lsh_num_chunks_before, c.lsh_num_chunks_after
        self.num_hashes, self.num_buckets, self.hash_seed = c.num_hashes, c.num_buckets, c.hash_seed
        self.max_positions, self.dropout = c.max_position_embeddings, c.lsh_attention_probs_dropout_prob
        self.query_key = nn.Linear(c.hidden_size, self.heads * self.head_dim, bias=False)
        self.value = nn.Linear(c.hidden_size, self.heads * self.head_dim, bias=False)

    def _choose_num_buckets(self, L: int) -> None:
        """transformers' _set_num_buckets: about 2 L / chunk buckets, as two factors past a limit; kept."""
        power = (2 * (L // self.chunk)).bit_length() - 1
        limit = 2 * max(int((self.max_positions // self.chunk) ** 0.5), self.chunk)
        self.num_buckets = 2 ** power if 2 ** power <= limit else (2 ** (power // 2), 2 ** (power - power // 2))

    def buckets(self, qk: Tensor, key_ok: Optional[Tensor]) -> Tensor:
        """[B, H, L, D] -> [B, H, num_hashes * L]: each position's bucket in each round, round r's buckets offset
        by r * (number of buckets), so that sorting keeps the rounds apart. Padding takes an extra last bucket."""
        H, D = self.heads, self.head_dim
        factors = (self.num_buckets,) if isinstance(self.num_buckets, int) else tuple(self.num_buckets)
        for f in factors:
            if f % 2:
                raise ValueError(f"num_buckets must be even (or factors that are), got {self.num_buckets}")
        rotation = sum(factors) if len(factors) > 1 else factors[0]
        g = None
        if self.hash_seed is not None:  # transformers seeds torch's generator; the same draws, no side effect
            g = torch.Generator(device=qk.device).manual_seed(self.hash_seed)
        rotations = torch.randn((H, D, self.num_hashes, rotation // 2), generator=g, device=qk.device,
                                dtype=qk.dtype)
        rotated = torch.einsum("bhld,hdnr->bhnlr", qk.detach(), rotations)
        buckets, start, count = 0, 0, 1
        for f in factors:
            part = rotated[..., start:start + f // 2]
            buckets = buckets + count * torch.argmax(torch.cat([part, -part], dim=-1), dim=-1)
            start, count = start + f // 2, count * f
        if key_ok is not None and not bool(key_ok.bool().all()):
            count += 1
            buckets = torch.where(key_ok.bool()[:, None, None, :], buckets, count - 1)
        offsets = torch.arange(self.num_hashes, device=qk.device)[:, None] * count
        return (buckets + offsets).flatten(2)

    def forward(self, x: Tensor, key_ok: Optional[Tensor]) -> Tensor:
        B, L, _ = x.shape
        H, D, R = self.heads, self.head_dim, self.num_hashes
        qk = self.query_key(x).view(B, L, H, D).transpose(1, 2)
        v = self.value(x).view(B, L, H, D).transpose(1, 2)
        if L <= self.chunk:  # one chunk: every position, no hashing
            R, order, n, c = 1, None, 1, L
            pos = torch.arange(L, device=x.device).expand(B, H, L)
        else:
            if self.num_buckets is None:
                self._choose_num_buckets(L)
            order = torch.argsort(self.buckets(qk, key_ok), dim=-1, stable=True)  # [B, H, R * L]
            pos = order % L
            idx = pos[..., None].expand(-1, -1, -1, D)
            qk, v = qk.repeat(1, 1, R, 1).gather(2, idx), v.repeat(1, 1, R, 1).gather(2, idx)
            n, c = R * L // self.chunk, self.chunk
        before, after = (0, 0) if n == 1 else (self.before, self.after)
        k = qk * torch.rsqrt(qk.pow(2).mean(-1, keepdim=True) + 1e-6) / math.sqrt(D)
        qk, k, v, q_pos = (t.reshape(B, H, n, c, *t.shape[3:]) for t in (qk, k, v, pos))
        k, v, k_pos = (roll_chunks(t, before, after) for t in (k, v, q_pos))
        itself = q_pos[..., :, None] == k_pos[..., None, :]
        vis = visibility(q_pos, k_pos, key_ok, self.causal)
        vis = itself if vis is None else vis | itself
        self_score = SELF_SCORE.get(qk.dtype, -1e5)
        self_bias = itself.to(qk.dtype) * self_score
        lse_grad = R > 1 and torch.is_grad_enabled() and (x.requires_grad or self.value.weight.requires_grad)
        out, lse = attend_chunks(qk, k, v, vis, self_bias, self.dropout if self.training else 0.0, lse_grad)
        if R > 1:
            # A row that sees only its own position (k copies: with the chunks rolled across rounds it can appear
            # twice) takes, in transformers, k scores of -1e5 beside scores of -1e9: log-sum-exp -1e5 + log k and
            # probability exp(-1e5 - that) on each copy, both in float32 at magnitude 1e5, where the rounding is
            # about 0.2% (k = 2: the copies' mass is 0.9978, not 1). Position 0 of a causal model is such a row
            # in every round. Its output is v times that mass, and the rounds are weighted by those log-sum-exps;
            # the same numbers are taken here (ours are 1 and score - 1e5 + log k, which round differently).
            only_self = ~(vis & ~itself).any(-1)
            self_lse = torch.logsumexp(self_bias.masked_fill(~itself, float("-inf")), -1)
            mass = itself.sum(-1) * torch.exp(self_bias.new_tensor(self_score) - self_lse)
            out = torch.where(only_self[..., None], out * mass[..., None].to(out.dtype), out)
            lse = torch.where(only_self, self_lse.to(lse.dtype), lse)
        out, lse = out.reshape(B, H, R * L, D), lse.reshape(B, H, R * L)
        if order is not None:  # back to sequence order, then the rounds combined by their log-sum-exps
            undo = torch.argsort(order, dim=-1)
            out = out.gather(2, undo[..., None].expand(-1, -1, -1, D)).view(B, H, R, L, D)
            lse = lse.gather(2, undo).view(B, H, R, L)
            weights = torch.exp(lse - torch.logsumexp(lse, dim=2, keepdim=True))  # float32 (the op's lse)
            out = (out * weights[..., None]).sum(2).to(x.dtype)
        return out.reshape(B, H, L, D).transpose(1, 2).reshape(B, L, H * D)
