"""Transformer-XL (Dai et al., 2019): segment-level recurrence with relative positional attention, the adaptive
input embedding and the adaptive softmax, in the layout of the original release (kimiyoung/transformer-xl,
pytorch/mem_transformer.py), so its checkpoints load with `load_state_dict`:

    word_emb.emb_layers.N.weight, word_emb.emb_projs.N         adaptive input (cutoffs, div_val), * sqrt(d_model)
    r_w_bias, r_r_bias                                        [n_head, d_head] (or per layer with untie_r)
    layers.N.dec_attn.{qkv_net, r_net, o_net, layer_norm}     attention (no biases in the projections)
    layers.N.pos_ff.{CoreNet.0, CoreNet.3, layer_norm}        ReLU feed-forward
    crit.{out_layers.N, out_projs.N, cluster_weight, cluster_bias}   adaptive softmax (tied as configured)

    model = TransfoXLLMHeadModel(config); model.load_state_dict(torch.load(...))  # (pos_emb.inv_freq: strict=False)
    out = model(ids[:, :L], labels=ids[:, 1:L + 1]); out2 = model(ids[:, L:2 * L], mems=out.mems)

transformers' layout (its TransfoXLLMHeadModel, transformers < 5) converts with `from_hf(hf_model)`, or
`from_hf_state(state_dict, config_dict)` from a saved state dict and config: the same names under `transformer.`,
but the rows of the adaptive softmax's cluster_weight / cluster_bias in the TF release's order (transformers
reads cluster i's log-probability at head column cutoffs[0] + i - 1, the release at column -i): reversed here.
No transformers import: transformers 5 has no Transformer-XL. transformers, given no mems, attends to mem_len zero
states (the release to none): `mems=model.zero_mems(B)` reproduces its first segments.

Attention: one `ptm_kernels.relative_attention` call per layer: AC + BD of the paper with the rel-shift done as
index arithmetic (r rows = distances klen-1 ... 0, clamped to clamp_len), causal over [memory; segment];
`same_length` (every query sees the same number of keys, mem_len, once klen > mem_len) is a sliding window
on top. Inputs and memory are batch first: mems is a list of n_layer + 1 tensors [B, M, d_model] (the input of
each layer, as the release keeps them), detached, the last mem_len positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ptm_kernels as pk
from ptm_kernels import AttentionMask
from ptm_kernels.nn import LayerNorm


@dataclass
class TransfoXLConfig:
    n_token: int = 267735
    d_model: int = 1024
    d_embed: int = 1024
    n_head: int = 16
    d_head: int = 64
    d_inner: int = 4096
    n_layer: int = 18
    cutoffs: Sequence[int] = (20000, 40000, 200000)
    div_val: int = 4
    tie_weight: bool = True
    tie_projs: Optional[Sequence[bool]] = None  # per cluster; default: [False] + [True] * len(cutoffs)
    pre_lnorm: bool = False
    untie_r: bool = False
    mem_len: int = 1600
    same_length: bool = True
    clamp_len: int = 1000
    dropout: float = 0.1
    dropatt: float = 0.0
    layer_norm_eps: float = 1e-5

    def projs_tied(self) -> List[bool]:
        return list(self.tie_projs) if self.tie_projs is not None else [False] + [True] * len(self.cutoffs)


def config_from_hf(hf: dict) -> TransfoXLConfig:
    """Our config from transformers' TransfoXLConfig fields (a dict: `config.to_dict()`); the variants this
    model does not run are refused, naming the field."""
    if hf.get("attn_type", 0) != 0:
        raise NotImplementedError(f"Transformer-XL with config field attn_type={hf['attn_type']} (only 0, the "
                                  "relative attention of the paper)")
    if hf.get("sample_softmax", -1) > 0:
        raise NotImplementedError(f"Transformer-XL with config field sample_softmax={hf['sample_softmax']}")
    if not hf.get("adaptive", True):
        raise NotImplementedError("Transformer-XL with config field adaptive=False")
    cutoffs = list(hf["cutoffs"])
    return TransfoXLConfig(
        n_token=hf["vocab_size"], d_model=hf["d_model"], d_embed=hf["d_embed"], n_head=hf["n_head"],
        d_head=hf["d_head"], d_inner=hf["d_inner"], n_layer=hf["n_layer"], cutoffs=tuple(cutoffs),
        div_val=hf["div_val"], tie_weight=hf.get("tie_word_embeddings", True),
        tie_projs=tuple(hf.get("tie_projs", [False] + [True] * len(cutoffs))), pre_lnorm=hf["pre_lnorm"],
        untie_r=hf["untie_r"], mem_len=hf["mem_len"], same_length=hf["same_length"], clamp_len=hf["clamp_len"],
        dropout=hf["dropout"], dropatt=hf["dropatt"], layer_norm_eps=hf["layer_norm_epsilon"])


@dataclass
class TransfoXLOutput:
    last_hidden_state: Tensor
    mems: List[Tensor] = field(default_factory=list)
    loss: Optional[Tensor] = None  # mean NLL over the labels != -100
    nll: Optional[Tensor] = None  # [B, L], 0 at ignored labels
    log_probs: Optional[Tensor] = None


# -------------------------------------------------------------------------------------------- embeddings


class AdaptiveEmbedding(nn.Module):
    """The release's AdaptiveEmbedding: cluster i (ids in [cutoff_{i-1}, cutoff_i)) has d_embed / div_val^i
    dimensions projected to d_model; everything scaled by sqrt(d_model)."""

    def __init__(self, n_token: int, d_embed: int, d_proj: int, cutoffs: Sequence[int], div_val: int = 1):
        super().__init__()
        self.cutoff_ends = [0] + list(cutoffs) + [n_token]
        self.d_embed, self.d_proj, self.div_val = d_embed, d_proj, div_val
        self.emb_scale = d_proj ** 0.5
        self.emb_layers = nn.ModuleList()
        self.emb_projs = nn.ParameterList()
        if div_val == 1:
            self.emb_layers.append(nn.Embedding(n_token, d_embed))
            if d_proj != d_embed:
                self.emb_projs.append(nn.Parameter(torch.randn(d_proj, d_embed) * 0.02))
        else:
            for i in range(len(self.cutoff_ends) - 1):
                lo, hi = self.cutoff_ends[i], self.cutoff_ends[i + 1]
                d_i = d_embed // (div_val ** i)
                self.emb_layers.append(nn.Embedding(hi - lo, d_i))
                self.emb_projs.append(nn.Parameter(torch.randn(d_proj, d_i) * 0.02))

    def forward(self, ids: Tensor) -> Tensor:
        if self.div_val == 1:
            emb = self.emb_layers[0](ids)
            if self.d_proj != self.d_embed:
                emb = F.linear(emb, self.emb_projs[0])
            return emb * self.emb_scale
        flat = ids.reshape(-1)
        out = torch.zeros(flat.shape[0], self.d_proj, dtype=self.emb_projs[0].dtype, device=ids.device)
        for i in range(len(self.cutoff_ends) - 1):
            lo, hi = self.cutoff_ends[i], self.cutoff_ends[i + 1]
            idx = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)
            if idx.numel():
                out = out.index_copy(0, idx, F.linear(self.emb_layers[i](flat[idx] - lo), self.emb_projs[i]))
        return (out * self.emb_scale).view(*ids.shape, self.d_proj)


def positional_embedding(pos_seq: Tensor, d_model: int) -> Tensor:
    inv_freq = 1 / (10000 ** (torch.arange(0.0, d_model, 2.0, device=pos_seq.device) / d_model))
    x = torch.outer(pos_seq, inv_freq)
    return torch.cat([x.sin(), x.cos()], -1)


# --------------------------------------------------------------------------------------------- layers


class RelPartialLearnableMultiHeadAttn(nn.Module):
    def __init__(self, c: TransfoXLConfig):
        super().__init__()
        H, D = c.n_head, c.d_head
        self.n_head, self.d_head = H, D
        self.qkv_net = nn.Linear(c.d_model, 3 * H * D, bias=False)
        self.r_net = nn.Linear(c.d_model, H * D, bias=False)
        self.o_net = nn.Linear(H * D, c.d_model, bias=False)
        self.layer_norm = LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.pre_lnorm, self.dropout, self.dropatt = c.pre_lnorm, c.dropout, c.dropatt
        if c.untie_r:
            self.r_w_bias = nn.Parameter(torch.randn(H, D) * 0.02)
            self.r_r_bias = nn.Parameter(torch.randn(H, D) * 0.02)

    def forward(self, w: Tensor, pos_emb: Tensor, r_w_bias: Tensor, r_r_bias: Tensor, mask: AttentionMask,
                mem: Optional[Tensor]) -> Tensor:
        B, L, C = w.shape
        H, D = self.n_head, self.d_head
        cat = w if mem is None or mem.shape[1] == 0 else torch.cat([mem, w], 1)
        if self.pre_lnorm:
            cat = self.layer_norm(cat)
        wq, wkv = self.qkv_net.weight.split([H * D, 2 * H * D])
        q = F.linear(cat[:, -L:], wq).view(B, L, H, D).transpose(1, 2)
        k, v = F.linear(cat, wkv).view(B, -1, 2, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        r = self.r_net(pos_emb).view(-1, H, D).transpose(0, 1)  # [H, klen, D], distances klen-1 ... 0
        if hasattr(self, "r_w_bias"):
            r_w_bias, r_r_bias = self.r_w_bias, self.r_r_bias
        out = pk.relative_attention(q, k, v, r, r_w_bias, r_r_bias, mask=mask,
                                    dropout_p=self.dropatt if self.training else 0.0)
        out = F.dropout(self.o_net(out.transpose(1, 2).reshape(B, L, H * D)), self.dropout, self.training)
        return out + w if self.pre_lnorm else self.layer_norm(out, residual=w)[0]


class PositionwiseFF(nn.Module):
    def __init__(self, c: TransfoXLConfig):
        super().__init__()
        self.CoreNet = nn.Sequential(nn.Linear(c.d_model, c.d_inner), nn.ReLU(inplace=True), nn.Dropout(c.dropout),
                                     nn.Linear(c.d_inner, c.d_model), nn.Dropout(c.dropout))
        self.layer_norm = LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.pre_lnorm = c.pre_lnorm

    def forward(self, x: Tensor) -> Tensor:
        h = self.layer_norm(x) if self.pre_lnorm else x
        y = self.CoreNet(h)
        return y + x if self.pre_lnorm else self.layer_norm(y, residual=x)[0]


class RelPartialLearnableDecoderLayer(nn.Module):
    def __init__(self, c: TransfoXLConfig):
        super().__init__()
        self.dec_attn = RelPartialLearnableMultiHeadAttn(c)
        self.pos_ff = PositionwiseFF(c)

    def forward(self, x, pos_emb, r_w_bias, r_r_bias, mask, mem):
        return self.pos_ff(self.dec_attn(x, pos_emb, r_w_bias, r_r_bias, mask, mem))


# ---------------------------------------------------------------------------------------- adaptive softmax


class ProjectedAdaptiveLogSoftmax(nn.Module):
    """The release's adaptive softmax: a head over the first cluster's words and one logit per tail cluster
    (cluster i's logit is head column -i, as in the release), each tail a softmax of its own; `log_probs`
    gives the full [N, n_token] log-probabilities (log p(cluster) + log p(word | cluster))."""

    def __init__(self, n_token: int, d_embed: int, d_proj: int, cutoffs: Sequence[int], div_val: int = 1):
        super().__init__()
        self.cutoffs = list(cutoffs) + [n_token]
        self.cutoff_ends = [0] + self.cutoffs
        self.n_clusters = len(self.cutoffs) - 1
        self.div_val, self.d_embed, self.d_proj = div_val, d_embed, d_proj
        if self.n_clusters > 0:
            self.cluster_weight = nn.Parameter(torch.zeros(self.n_clusters, d_embed))
            self.cluster_bias = nn.Parameter(torch.zeros(self.n_clusters))
        self.out_layers = nn.ModuleList()
        self.out_projs = nn.ParameterList()
        if div_val == 1:
            for _ in range(len(self.cutoffs)):  # one projection per cluster, as in the release
                self.out_projs.append(nn.Parameter(torch.randn(d_proj, d_embed) * 0.02) if d_proj != d_embed else None)
            self.out_layers.append(nn.Linear(d_embed, n_token))
        else:
            for i in range(len(self.cutoffs)):
                lo, hi = self.cutoff_ends[i], self.cutoff_ends[i + 1]
                d_i = d_embed // (div_val ** i)
                self.out_projs.append(nn.Parameter(torch.randn(d_proj, d_i) * 0.02))
                self.out_layers.append(nn.Linear(d_i, hi - lo))

    @staticmethod
    def _logit(h: Tensor, weight: Tensor, bias: Tensor, proj: Optional[Tensor]) -> Tensor:
        return F.linear(h if proj is None else h @ proj, weight, bias)

    def log_probs(self, h: Tensor) -> Tensor:
        if self.n_clusters == 0:
            return F.log_softmax(self._logit(h, self.out_layers[0].weight, self.out_layers[0].bias,
                                             self.out_projs[0]).float(), -1)
        weights, biases = [], []
        for i in range(len(self.cutoffs)):
            if self.div_val == 1:
                lo, hi = self.cutoff_ends[i], self.cutoff_ends[i + 1]
                w_i, b_i = self.out_layers[0].weight[lo:hi], self.out_layers[0].bias[lo:hi]
            else:
                w_i, b_i = self.out_layers[i].weight, self.out_layers[i].bias
            if i == 0:
                w_i, b_i = torch.cat([w_i, self.cluster_weight]), torch.cat([b_i, self.cluster_bias])
            weights.append(w_i), biases.append(b_i)
        head = F.log_softmax(self._logit(h, weights[0], biases[0], self.out_projs[0]).float(), -1)
        parts = [head[:, :self.cutoffs[0]]]
        for i in range(1, len(self.cutoffs)):
            tail = F.log_softmax(self._logit(h, weights[i], biases[i], self.out_projs[i]).float(), -1)
            parts.append(head[:, -i, None] + tail)
        return torch.cat(parts, -1)


# ---------------------------------------------------------------------------------------------- model


class TransfoXLLMHeadModel(nn.Module):
    """MemTransformerLM (attn_type 0) with its adaptive softmax."""

    def __init__(self, config: TransfoXLConfig):
        super().__init__()
        self.config = c = config
        self.word_emb = AdaptiveEmbedding(c.n_token, c.d_embed, c.d_model, c.cutoffs, c.div_val)
        self.layers = nn.ModuleList(RelPartialLearnableDecoderLayer(c) for _ in range(c.n_layer))
        if not c.untie_r:
            self.r_w_bias = nn.Parameter(torch.randn(c.n_head, c.d_head) * 0.02)
            self.r_r_bias = nn.Parameter(torch.randn(c.n_head, c.d_head) * 0.02)
        self.crit = ProjectedAdaptiveLogSoftmax(c.n_token, c.d_embed, c.d_model, c.cutoffs, c.div_val)
        if c.tie_weight:
            for i in range(len(self.crit.out_layers)):
                self.crit.out_layers[i].weight = self.word_emb.emb_layers[i].weight
        for i, tie in enumerate(c.projs_tied()):
            if not tie:
                continue
            if c.div_val == 1 and c.d_model != c.d_embed:
                self.crit.out_projs[i] = self.word_emb.emb_projs[0]
            elif c.div_val != 1 and i < len(self.crit.out_projs):
                self.crit.out_projs[i] = self.word_emb.emb_projs[i]

    @classmethod
    def from_hf(cls, hf_model, dtype: Optional[torch.dtype] = None) -> "TransfoXLLMHeadModel":
        """From transformers' TransfoXLLMHeadModel (transformers < 5), read through its config and state dict."""
        return cls.from_hf_state(hf_model.state_dict(), hf_model.config.to_dict(), dtype=dtype)

    @classmethod
    def from_hf_state(cls, state_dict, hf_config: dict, dtype: Optional[torch.dtype] = None) -> "TransfoXLLMHeadModel":
        """From a state dict and config (a dict of TransfoXLConfig's fields) in transformers' layout; in the
        state dict's dtype unless `dtype` asks for another."""
        from .convert import cast, load_from_hf

        config = config_from_hf(hf_config)
        model = cls(config)
        state = dict(state_dict)
        for k in ("crit.cluster_weight", "crit.cluster_bias"):  # the TF release's cluster order -> the release's
            if k in state:
                state[k] = state[k].flip(0)
        mapping = [(k, "transformer." + k if not k.startswith("crit.") else k) for k in model.state_dict()]
        load_from_hf(model, state, mapping, derived=("transformer.pos_emb.inv_freq",))
        floating = {t.dtype for t in state_dict.values() if t.is_floating_point()}
        return cast(model, dtype or (floating.pop() if len(floating) == 1 else torch.float32))

    def zero_mems(self, batch_size: int) -> List[Tensor]:
        """mem_len zero states per layer: what transformers' TransfoXL attends to when given no mems (the
        release starts with an empty memory, as `mems=None` does here)."""
        p = next(self.parameters())
        return [p.new_zeros(batch_size, self.config.mem_len, self.config.d_model)
                for _ in range(self.config.n_layer + 1)]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also takes the release's checkpoints, which carry the pos_emb.inv_freq buffer."""
        state_dict = {k: v for k, v in state_dict.items() if k != "pos_emb.inv_freq"}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def attention_mask(self, L: int, M: int) -> AttentionMask:
        c = self.config
        mask = AttentionMask.causal()
        if c.same_length and M + L > c.mem_len:  # the release: each query sees its last mem_len keys
            mask = mask & AttentionMask.sliding_window(max(c.mem_len - 1, 0), 0)
        return mask

    def forward(self, input_ids: Tensor, mems: Optional[List[Tensor]] = None, labels: Optional[Tensor] = None,
                return_log_probs: bool = False) -> TransfoXLOutput:
        """input_ids [B, L]; labels [B, L]: the token that follows each input (-100: ignored)."""
        c = self.config
        B, L = input_ids.shape
        M = mems[0].shape[1] if mems else 0
        emb = self.word_emb(input_ids)
        pos_seq = torch.arange(M + L - 1, -1, -1.0, device=emb.device, dtype=emb.dtype)
        if c.clamp_len > 0:
            pos_seq = pos_seq.clamp(max=c.clamp_len)
        pos_emb = F.dropout(positional_embedding(pos_seq, c.d_model), c.dropout, self.training)
        x = F.dropout(emb, c.dropout, self.training)
        mask = self.attention_mask(L, M)
        hids = [x]
        rw, rr = (getattr(self, "r_w_bias", None), getattr(self, "r_r_bias", None))
        for i, layer in enumerate(self.layers):
            x = layer(x, pos_emb, rw, rr, mask, mems[i] if mems else None)
            hids.append(x)
        x = F.dropout(x, c.dropout, self.training)
        new_mems = self._update_mems(hids, mems)
        out = TransfoXLOutput(last_hidden_state=x, mems=new_mems)
        if labels is not None or return_log_probs:
            lp = self.crit.log_probs(x.reshape(B * L, -1))
            if return_log_probs:
                out.log_probs = lp.view(B, L, -1)
            if labels is not None:
                valid = labels != -100
                nll = -lp.gather(1, labels.clamp(min=0).reshape(-1, 1)).view(B, L) * valid
                out.nll, out.loss = nll, nll.sum() / valid.sum().clamp(min=1)
        return out

    def _update_mems(self, hids: List[Tensor], mems: Optional[List[Tensor]]) -> List[Tensor]:
        if self.config.mem_len <= 0:
            return []
        with torch.no_grad():
            return [(h if not mems else torch.cat([m, h], 1))[:, -self.config.mem_len:].detach()
                    for h, m in zip(hids, mems or [None] * len(hids))]


@torch.no_grad()
def evaluate_stream(model: TransfoXLLMHeadModel, ids: Tensor, tgt_len: int) -> float:
    """Mean NLL per token of a long stream ids [B, T], read in segments of tgt_len with the memory carried
    (each token t predicted from everything before it within the memory's reach)."""
    model.eval()
    mems, total, count = None, 0.0, 0
    for s in range(0, ids.shape[1] - 1, tgt_len):
        e = min(s + tgt_len, ids.shape[1] - 1)
        out = model(ids[:, s:e], mems=mems, labels=ids[:, s + 1:e + 1])
        mems = out.mems
        total += out.nll.sum().item()
        count += out.nll.numel()
    return total / count
