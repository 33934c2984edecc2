"""XLNet (Yang et al., 2019): permutation language modelling with two-stream relative attention, as transformers'
`xlnet`, on `ptm_kernels.two_stream_attention` / `ptm_kernels.relative_attention`.

    model = XLNetLMHeadModel.from_hf(hf_model)
    batch = permutation_lm_inputs(input_ids, K=6, attention_mask=mask)     # perm_mask, target_mapping, labels
    out = model(input_ids, attention_mask=mask, token_type_ids=tt, **batch)  # logits [B, n_predict, V]
    out2 = model(next_ids, mems=out.mems)                                   # segment recurrence

Per layer: k, v from [memory; h], q of both streams from h (content) and g (query); one fused two-stream call
computes (q + r_w_bias)·k + (q + r_r_bias)·r[rel. distance] + (q + r_s_bias)·seg_embed[same segment?], the masks
and the softmax for both streams, loading each tile of k, v and r once. The query stream has only the predicted
rows (target_mapping's one-hot rows become `query_positions`; an all-zero row, a padded prediction, gives a zero
attention vector as in transformers). Post-attention: output projection, residual add fused into LayerNorm;
feed-forward: Linear, bias + GELU fused, Linear, add & LayerNorm fused.

Inputs are batch first (mems too: a list of [B, M, d_model], one per layer). Masks as in transformers:
attention_mask (1 = token) or input_mask (1 = padding), perm_mask [B, L, L] (1: i may not attend to j).
attn_type "bi" (the pre-training setting) or "uni" (causal with memory; same_length), bi_data (the batch
halves use forward and backward position encodings), clamp_len. As AttentionMask parts (XLNetModel.masks):
"uni" is the causal part, same_length a window, the memory lines up by the parts' bottom-right alignment (no
[B, L, M + L] tensor), the query stream's padding is a key-padding part; the permutation mask is a dense part,
and so is the content stream's padding (it always sees its own token: no analytic part says "padding except
the query's own key"). A query-stream row that sees no key gives zeros (transformers gives
the uniform average); no row produced by `permutation_lm_inputs` is in that case.
Heads: LM (tied to the word embeddings, with a bias), sequence classification (last-token summary, projection,
tanh, logits), span QA (start / end logits: XLNetForQuestionAnsweringSimple), SQuAD 2.0 QA with beam search
and answerability (XLNetForQuestionAnswering, heads.SQuADHead).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ptm_kernels as pk
from ptm_kernels import AttentionMask
from ptm_kernels.nn import LayerNorm

from . import activations
from .blocks import MLP
from .convert import HFTwin, SingleLabelClassifier, config_kwargs, prefixed
from .heads import ClassificationHead, SQuADHead, SQuADOutput, cross_entropy, linear_mapping


@dataclass
class XLNetConfig:
    vocab_size: int = 32000
    d_model: int = 1024
    n_layer: int = 24
    n_head: int = 16
    d_inner: int = 4096
    ff_activation: str = "gelu"
    attn_type: str = "bi"
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    mem_len: Optional[int] = 512
    reuse_len: Optional[int] = None
    use_mems_eval: bool = True
    use_mems_train: bool = False
    bi_data: bool = False
    clamp_len: int = -1
    same_length: bool = False
    summary_type: str = "last"
    summary_use_proj: bool = True
    summary_activation: Optional[str] = "tanh"
    summary_last_dropout: float = 0.1
    start_n_top: int = 5  # XLNetForQuestionAnswering's beam: the most probable starts, and ends per start
    end_n_top: int = 5
    num_labels: int = 2
    pad_token_id: int = 5
    bos_token_id: int = 1
    eos_token_id: int = 2

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    @classmethod
    def from_hf(cls, hf_config):
        activations.check(hf_config.ff_activation, "ff_activation")
        return cls(**config_kwargs(cls, hf_config))

    def to_hf(self):
        import transformers

        return transformers.XLNetConfig(**dataclasses.asdict(self))


@dataclass
class XLNetOutput:
    last_hidden_state: Optional[Tensor] = None
    mems: Optional[List[Tensor]] = None
    logits: Optional[Tensor] = None
    start_logits: Optional[Tensor] = None
    end_logits: Optional[Tensor] = None
    loss: Optional[Tensor] = None


def relative_positions(qlen: int, klen: int, c: XLNetConfig, bsz: int, device) -> Tensor:
    """The sinusoid embeddings of the relative distances, decreasing (transformers' relative_positional_encoding):
    [R, d_model], or [bsz, R, d_model] with bi_data (first half forward distances, second half backward)."""
    freq = torch.arange(0, c.d_model, 2, dtype=torch.int64, device=device).float()
    inv_freq = 1 / torch.pow(10000, freq / c.d_model)
    beg, end = (klen, -qlen) if c.attn_type == "bi" else (klen, -1)

    def emb(seq):
        if c.clamp_len > 0:
            seq = seq.clamp(-c.clamp_len, c.clamp_len)
        x = seq[:, None] * inv_freq
        return torch.cat([torch.sin(x), torch.cos(x)], -1)

    fwd = emb(torch.arange(beg, end, -1, dtype=torch.int64, device=device).float())
    if not c.bi_data:
        return fwd
    bwd = emb(torch.arange(-beg, -end, 1, dtype=torch.int64, device=device).float())
    return torch.cat([fwd[None].expand(bsz // 2, -1, -1), bwd[None].expand(bsz - bsz // 2, -1, -1)], 0)


class RelativeAttention(nn.Module):
    """transformers' XLNetRelativeAttention parameters (q, k, v, o, r [d_model, H, D]; r_w_bias, r_r_bias,
    r_s_bias [H, D]; seg_embed [2, H, D]; layer_norm) on the fused relative-attention ops."""

    def __init__(self, c: XLNetConfig):
        super().__init__()
        H, D, C = c.n_head, c.d_head, c.d_model
        for name in ("q", "k", "v", "o", "r"):
            setattr(self, name, nn.Parameter(torch.randn(C, H, D) * 0.02))
        for name in ("r_r_bias", "r_s_bias", "r_w_bias"):
            setattr(self, name, nn.Parameter(torch.randn(H, D) * 0.02))
        self.seg_embed = nn.Parameter(torch.randn(2, H, D) * 0.02)
        self.layer_norm = LayerNorm(C, eps=c.layer_norm_eps)
        self.dropout = c.dropout
        self.H, self.D = H, D

    def _heads(self, x: Tensor, w: Tensor) -> Tensor:  # [B, L, C] -> [B, H, L, D] (a view, unit last stride)
        B, L, _ = x.shape
        return (x @ w.flatten(1)).view(B, L, self.H, self.D).transpose(1, 2)

    def _post(self, x: Tensor, vec: Tensor) -> Tensor:
        B, H, L, D = vec.shape
        out = vec.transpose(1, 2).reshape(B, L, H * D) @ self.o.flatten(1).t()
        return self.layer_norm(F.dropout(out, self.dropout, self.training), residual=x)[0]

    def forward(self, h: Tensor, g: Optional[Tensor], pos_emb: Tensor, mem: Optional[Tensor], seg: Optional[Tensor],
                content_mask: Optional[AttentionMask], query_mask: Optional[AttentionMask],
                query_positions: Optional[Tensor], query_weight: Optional[Tensor]):
        cat = h if mem is None else torch.cat([mem, h], 1)
        k, v = self._heads(cat, self.k), self._heads(cat, self.v)
        r = (pos_emb @ self.r.flatten(1)).unflatten(-1, (self.H, self.D)).transpose(-3, -2)  # [(B,) H, R, D]
        seg_kw = {} if seg is None else dict(segment_ids=seg, seg_embed=self.seg_embed, s_bias=self.r_s_bias)
        p = self.dropout if self.training else 0.0
        q_h = self._heads(h, self.q)
        if g is None:
            out_h = pk.relative_attention(q_h, k, v, r, self.r_w_bias, self.r_r_bias, mask=content_mask,
                                          dropout_p=p, **seg_kw)
            return self._post(h, out_h), None
        out_h, out_g = pk.two_stream_attention(q_h, self._heads(g, self.q), k, v, r, self.r_w_bias, self.r_r_bias,
                                               query_positions=query_positions, content_mask=content_mask,
                                               query_mask=query_mask, dropout_p=p, **seg_kw)
        if query_weight is not None:
            out_g = out_g * query_weight[:, None, :, None].to(out_g.dtype)
        return self._post(h, out_h), self._post(g, out_g)


class XLNetLayer(nn.Module):
    """Two-stream relative attention (its own add & LayerNorm inside), then the feed-forward: blocks.MLP
    (layer_1, act with its bias fused, dropout, layer_2), dropout, add & LayerNorm fused; both streams share
    the weights."""

    def __init__(self, c: XLNetConfig):
        super().__init__()
        self.rel_attn = RelativeAttention(c)
        self.ff = MLP(c.d_model, c.d_inner, c.ff_activation, dropout=c.dropout)
        self.ff_norm = LayerNorm(c.d_model, eps=c.layer_norm_eps)
        self.dropout = c.dropout

    def feed_forward(self, x: Tensor) -> Tensor:  # [B, L, C] -> [B, L, C]
        return self.ff_norm(F.dropout(self.ff(x), self.dropout, self.training), residual=x)[0]

    def forward(self, h, g, *args):
        h, g = self.rel_attn(h, g, *args)
        return self.feed_forward(h), (None if g is None else self.feed_forward(g))


class XLNetModel(nn.Module):
    def __init__(self, config: XLNetConfig):
        super().__init__()
        self.config = c = config
        if c.attn_type not in ("bi", "uni"):
            raise ValueError(f"attn_type must be 'bi' or 'uni', got {c.attn_type!r}")
        self.word_embedding = nn.Embedding(c.vocab_size, c.d_model)
        self.mask_emb = nn.Parameter(torch.randn(1, 1, c.d_model) * 0.02)
        self.layer = nn.ModuleList(XLNetLayer(c) for _ in range(c.n_layer))

    def cache_mem(self, cur: Tensor, prev: Optional[Tensor]) -> Tensor:
        c = self.config
        if c.reuse_len is not None and c.reuse_len > 0:
            cur = cur[:, :c.reuse_len]
        cat = cur if prev is None else torch.cat([prev, cur], 1)
        return (cat if not c.mem_len else cat[:, -c.mem_len:]).detach()

    def masks(self, B: int, L: int, M: int, attention_mask, input_mask, perm_mask, positions, device):
        """(content_mask, query_mask) AttentionMasks (None: everything visible) over the M + L keys (memory first).

        Analytic parts: attn_type "uni" is causal (key j visible to the query at position p iff j <= M + p:
        the bottom-right causal part, which lines the memory up), same_length adds a window of M keys to the
        left; padding (1 - attention_mask, or input_mask) in the query stream is a key-padding part. The
        permutation mask stays dense ([B, 1, L|Lg, M + L] bool, True = visible). The content stream always sees
        its own token (transformers' non_tgt_mask): with padding but no permutation that is "padding, except
        the query's own key", which no analytic part expresses, so it goes in as a dense part there too."""
        c = self.config
        analytic = None
        if c.attn_type == "uni":
            analytic = AttentionMask.causal()
            if c.same_length:  # transformers' create_mask: also no key more than M positions to the left
                analytic = analytic & AttentionMask.sliding_window(M, None)
        if input_mask is None and attention_mask is not None:
            input_mask = 1 - attention_mask
        pad = None if input_mask is None else input_mask > 0  # [B, L] True = padding
        perm = None if perm_mask is None else perm_mask > 0  # [B, L, L] True = i may not see j
        if pad is None and perm is None:
            return analytic, analytic

        def both(dense):
            return dense if analytic is None else analytic & dense

        def with_memory(hidden):  # [B, Lr, L] True = hidden -> the dense visible part over M + L keys
            visible = ~hidden
            if M > 0:
                visible = torch.cat([visible.new_ones(*visible.shape[:2], M), visible], 2)
            return AttentionMask.dense(visible.unsqueeze(1))

        hidden = perm if pad is None else pad[:, None, :].expand(B, L, L) if perm is None else perm | pad[:, None, :]
        eye = torch.eye(L, dtype=torch.bool, device=device)
        content = both(with_memory(hidden & ~eye))
        if positions is None:
            return content, None
        if perm is None:  # padding only: a key-padding part (lengths when every row is right-padded)
            real = torch.cat([pad.new_zeros(B, M), pad], 1).logical_not()
            return content, both(AttentionMask.key_padding(mask=real))
        rows = hidden.gather(1, positions.unsqueeze(-1).expand(B, positions.shape[1], L))  # [B, Lg, L]
        return content, both(with_memory(rows))

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, mems: Optional[Sequence] = None,
                perm_mask: Optional[Tensor] = None, target_mapping: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, input_mask: Optional[Tensor] = None,
                use_mems: Optional[bool] = None) -> XLNetOutput:
        c = self.config
        B, L = input_ids.shape
        M = mems[0].shape[1] if mems is not None and mems[0] is not None else 0
        device = input_ids.device
        if use_mems is None:
            use_mems = c.use_mems_train if self.training else c.use_mems_eval
        h = F.dropout(self.word_embedding(input_ids), c.dropout, self.training)  # [B, L, C]: the content stream
        g = positions = weight = None
        if target_mapping is not None:
            Lg = target_mapping.shape[1]
            positions = target_mapping.argmax(-1)  # [B, Lg] one-hot rows: the predicted position of each row
            weight = target_mapping.gather(2, positions.unsqueeze(-1)).squeeze(-1)
            g = F.dropout(self.mask_emb.expand(B, Lg, -1), c.dropout, self.training)  # [B, Lg, C]: query stream
        content_mask, query_mask = self.masks(B, L, M, attention_mask, input_mask, perm_mask, positions, device)
        pos_emb = F.dropout(relative_positions(L, M + L, c, B, device).to(h.dtype), c.dropout, self.training)
        new_mems = []
        for i, layer in enumerate(self.layer):
            mem = mems[i] if mems is not None else None
            if use_mems:
                new_mems.append(self.cache_mem(h, mem))
            h, g = layer(h, g, pos_emb, mem, token_type_ids, content_mask, query_mask, positions, weight)
        out = F.dropout(g if g is not None else h, c.dropout, self.training)
        return XLNetOutput(last_hidden_state=out, mems=new_mems if use_mems else None)

    def hf_mapping(self) -> list:
        m = [("word_embedding.weight", "word_embedding.weight"), ("mask_emb", "mask_emb")]
        attn = [n for n, _ in self.layer[0].rel_attn.named_parameters()]  # transformers' names
        ff = [("ff.fc.weight", "ff.layer_1.weight"), ("ff.fc_bias", "ff.layer_1.bias"),
              ("ff.proj.weight", "ff.layer_2.weight"), ("ff.proj.bias", "ff.layer_2.bias"),
              ("ff_norm.weight", "ff.layer_norm.weight"), ("ff_norm.bias", "ff.layer_norm.bias")]
        for i in range(len(self.layer)):
            m += [(f"layer.{i}.rel_attn.{n}", f"layer.{i}.rel_attn.{n}") for n in attn]
            m += prefixed(ff, f"layer.{i}.", f"layer.{i}.")
        return m


# ----------------------------------------------------------------------------------------------- heads


class _XLNetTask(HFTwin, nn.Module):
    config_class = XLNetConfig

    def backbone_mapping(self) -> list:
        return prefixed(self.transformer.hf_mapping(), "transformer.", "transformer.")


class XLNetLMHeadModel(_XLNetTask):
    hf_class = "XLNetLMHeadModel"

    def __init__(self, config: XLNetConfig):
        super().__init__()
        self.config = config
        self.transformer = XLNetModel(config)
        self.lm_loss = nn.Linear(config.d_model, config.vocab_size)
        self.lm_loss.weight = self.transformer.word_embedding.weight

    def forward(self, input_ids, attention_mask=None, mems=None, perm_mask=None, target_mapping=None,
                token_type_ids=None, input_mask=None, use_mems=None, labels=None) -> XLNetOutput:
        """logits [B, P, V] (P = target_mapping's rows, else L); with labels [B, P] the loss only (logits=None):
        the fused linear cross-entropy over the rows, the [B * P, V] logits never materialised."""
        out = self.transformer(input_ids, attention_mask, mems, perm_mask, target_mapping, token_type_ids,
                               input_mask, use_mems)
        if labels is not None:
            out.loss = pk.linear_cross_entropy(out.last_hidden_state, self.lm_loss.weight, labels, self.lm_loss.bias,
                                               ignore_index=-100)
        else:
            out.logits = self.lm_loss(out.last_hidden_state)
        return out

    def hf_mapping(self):
        return self.backbone_mapping() + [("lm_loss.weight", "lm_loss.weight"), ("lm_loss.bias", "lm_loss.bias")]


class XLNetForSequenceClassification(SingleLabelClassifier, _XLNetTask):
    """Summary of the last (first, mean) token: transformers' XLNetSequenceSummary (projection, tanh, dropout),
    then logits_proj: heads.ClassificationHead."""
    hf_class = "XLNetForSequenceClassification"

    def __init__(self, config: XLNetConfig):
        super().__init__()
        self.config = c = config
        if c.summary_type not in ("last", "first", "mean"):
            raise ValueError(f"summary_type must be 'last', 'first' or 'mean', got {c.summary_type!r}")
        self.transformer = XLNetModel(c)
        self.classifier = ClassificationHead(c.d_model, c.num_labels, dense=c.d_model if c.summary_use_proj else None,
                                             act=c.summary_activation or "linear", p_mid=c.summary_last_dropout)

    def forward(self, input_ids, attention_mask=None, mems=None, token_type_ids=None, input_mask=None,
                use_mems=None, labels=None) -> XLNetOutput:
        c = self.config
        out = self.transformer(input_ids, attention_mask, mems, None, None, token_type_ids, input_mask, use_mems)
        h = out.last_hidden_state  # [B, L, C]
        s = h[:, -1] if c.summary_type == "last" else h[:, 0] if c.summary_type == "first" else h.mean(1)
        out.logits = self.classifier(s)
        out.loss = cross_entropy(out.logits, labels)
        return out

    def hf_mapping(self):
        return self.backbone_mapping() + self.classifier.mapping("classifier", "sequence_summary.summary",
                                                                 "logits_proj")


class XLNetForQuestionAnsweringSimple(_XLNetTask):
    """Span QA: a start and an end logit per token (on the content stream)."""
    hf_class = "XLNetForQuestionAnsweringSimple"

    def __init__(self, config: XLNetConfig):
        super().__init__()
        self.config = config
        self.transformer = XLNetModel(config)
        self.qa_outputs = nn.Linear(config.d_model, 2)

    def forward(self, input_ids, attention_mask=None, mems=None, token_type_ids=None, input_mask=None,
                use_mems=None, start_positions=None, end_positions=None) -> XLNetOutput:
        out = self.transformer(input_ids, attention_mask, mems, None, None, token_type_ids, input_mask, use_mems)
        out.start_logits, out.end_logits = self.qa_outputs(out.last_hidden_state).unbind(-1)
        if start_positions is not None and end_positions is not None:
            out.loss = (cross_entropy(out.start_logits, start_positions)
                        + cross_entropy(out.end_logits, end_positions)) / 2
        return out

    def hf_mapping(self):
        return self.backbone_mapping() + linear_mapping("qa_outputs", "qa_outputs")


class XLNetForQuestionAnswering(_XLNetTask):
    """SQuAD 2.0 QA with beam search over (start, end) and an answerability class (heads.SQuADHead, as XLM's).
    forward(input_ids, ..., start_positions=, end_positions=, cls_index=, is_impossible=, p_mask=) ->
    heads.SQuADOutput (with the mems)."""
    hf_class = "XLNetForQuestionAnswering"

    def __init__(self, config: XLNetConfig):
        super().__init__()
        self.config = c = config
        self.transformer = XLNetModel(c)
        self.qa_outputs = SQuADHead(c.d_model, c.layer_norm_eps, c.start_n_top, c.end_n_top)

    def forward(self, input_ids, attention_mask=None, mems=None, token_type_ids=None, input_mask=None,
                use_mems=None, start_positions=None, end_positions=None, cls_index=None, is_impossible=None,
                p_mask=None) -> SQuADOutput:
        h = self.transformer(input_ids, attention_mask, mems, None, None, token_type_ids, input_mask, use_mems)
        out = self.qa_outputs(h.last_hidden_state, start_positions, end_positions, cls_index, is_impossible, p_mask)
        out.last_hidden_state, out.mems = h.last_hidden_state, h.mems
        return out

    def hf_mapping(self):
        return self.backbone_mapping() + prefixed(self.qa_outputs.mapping(), "qa_outputs.", "")


# ------------------------------------------------------------------------------ permutation-LM inputs


def permutation_lm_inputs(input_ids: Tensor, K: int = 6, attention_mask: Optional[Tensor] = None,
                          generator: Optional[torch.Generator] = None) -> dict:
    """XLNet's pre-training inputs with partial prediction: per sequence, sample a factorisation order of its
    real tokens and predict the last 1/K of it (at least one token, at most all but one).

    Returns perm_mask [B, L, L] float (1: i may not see j; as XLNet's _local_perm: every token sees the
    non-target tokens, a target sees the targets earlier in the order, a non-target sees no target),
    target_mapping [B, P, L] float one-hot (P = the most targets of any row; rows past a sequence's targets are
    zero), labels [B, P] (-100 at those rows)."""
    B, L = input_ids.shape
    real = attention_mask.bool() if attention_mask is not None else torch.ones(B, L, dtype=torch.bool)
    real = real.cpu()
    lengths = real.sum(1).tolist()
    n_pred = [min(max(1, n // K), max(n - 1, 1)) for n in lengths]
    P = max(n_pred)
    perm_mask = torch.zeros(B, L, L)
    target_mapping = torch.zeros(B, P, L)
    labels = torch.full((B, P), -100, dtype=torch.long)
    for b in range(B):
        pos = real[b].nonzero().squeeze(1)
        n = len(pos)
        order = pos[torch.randperm(n, generator=generator)]
        rank = torch.full((L,), -1, dtype=torch.long)
        rank[order] = torch.arange(n)
        target = rank >= n - n_pred[b]
        rev = torch.where(target, rank, torch.full_like(rank, -1))
        self_rev = torch.where(target, rev, rev + 1)
        perm_mask[b] = ((self_rev[:, None] <= rev[None, :]) & target[None, :]).float()
        tpos = target.nonzero().squeeze(1)
        target_mapping[b, torch.arange(len(tpos)), tpos] = 1.0
        labels[b, :len(tpos)] = input_ids[b, tpos.to(input_ids.device)].cpu()
    dev = input_ids.device
    return dict(perm_mask=perm_mask.to(dev), target_mapping=target_mapping.to(dev), labels=labels.to(dev))
