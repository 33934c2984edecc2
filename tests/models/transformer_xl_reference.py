"""Transformer-XL as the paper and its release compute it (kimiyoung/transformer-xl, pytorch/mem_transformer.py,
attn_type 0), transcribed as functions of a state dict in the release's layout: sequence-first tensors, AC + BD by
einsum, the padded `_rel_shift`, a [qlen, klen] mask filled with -inf, the release's same_length mask,
clamp_len, memory update, AdaptiveEmbedding and ProjectedAdaptiveLogSoftmax (per-target NLL, cluster i's
logit at head column -i)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rel_shift(x):
    zero_pad = torch.zeros((x.size(0), 1, *x.size()[2:]), dtype=x.dtype)
    x_padded = torch.cat([zero_pad, x], dim=1)
    x_padded = x_padded.view(x.size(1) + 1, x.size(0), *x.size()[2:])
    return x_padded[1:].view_as(x)


def adaptive_embedding(sd, c, inp):
    ends = [0] + list(c.cutoffs) + [c.n_token]
    if c.div_val == 1:
        embed = F.embedding(inp, sd["word_emb.emb_layers.0.weight"])
        if c.d_model != c.d_embed:
            embed = F.linear(embed, sd["word_emb.emb_projs.0"])
    else:
        inp_flat = inp.reshape(-1)
        emb_flat = torch.zeros(inp_flat.size(0), c.d_model)
        for i in range(len(ends) - 1):
            l_idx, r_idx = ends[i], ends[i + 1]
            mask_i = (inp_flat >= l_idx) & (inp_flat < r_idx)
            indices_i = mask_i.nonzero().squeeze(1)
            if indices_i.numel() == 0:
                continue
            emb_i = F.embedding(inp_flat.index_select(0, indices_i) - l_idx, sd[f"word_emb.emb_layers.{i}.weight"])
            emb_i = F.linear(emb_i, sd[f"word_emb.emb_projs.{i}"])
            emb_flat.index_copy_(0, indices_i, emb_i)
        embed = emb_flat.view(*inp.size(), c.d_model)
    return embed * c.d_model ** 0.5


def layer_norm(sd, prefix, x, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def attn(sd, c, p, w, r, r_w_bias, r_r_bias, attn_mask, mems):
    qlen, rlen, bsz = w.size(0), r.size(0), w.size(1)
    H, D = c.n_head, c.d_head
    cat = torch.cat([mems, w], 0) if mems is not None else w
    if c.pre_lnorm:
        cat = layer_norm(sd, p + "layer_norm", cat, c.layer_norm_eps)
    w_heads = cat @ sd[p + "qkv_net.weight"].t()
    r_head_k = r @ sd[p + "r_net.weight"].t()
    w_head_q, w_head_k, w_head_v = torch.chunk(w_heads, 3, dim=-1)
    w_head_q = w_head_q[-qlen:]
    klen = w_head_k.size(0)
    w_head_q = w_head_q.view(qlen, bsz, H, D)
    w_head_k = w_head_k.view(klen, bsz, H, D)
    w_head_v = w_head_v.view(klen, bsz, H, D)
    r_head_k = r_head_k.view(rlen, H, D)
    AC = torch.einsum("ibnd,jbnd->ijbn", w_head_q + r_w_bias, w_head_k)
    BD = rel_shift(torch.einsum("ibnd,jnd->ijbn", w_head_q + r_r_bias, r_head_k))
    attn_score = (AC + BD) * (1 / D ** 0.5)
    attn_score = attn_score.masked_fill(attn_mask[:, :, :, None], -float("inf"))
    attn_prob = F.softmax(attn_score, dim=1)
    attn_vec = torch.einsum("ijbn,jbnd->ibnd", attn_prob, w_head_v).reshape(qlen, bsz, H * D)
    attn_out = attn_vec @ sd[p + "o_net.weight"].t()
    if c.pre_lnorm:
        return w + attn_out
    return layer_norm(sd, p + "layer_norm", w + attn_out, c.layer_norm_eps)


def pos_ff(sd, c, p, x):
    h = layer_norm(sd, p + "layer_norm", x, c.layer_norm_eps) if c.pre_lnorm else x
    core = torch.relu(h @ sd[p + "CoreNet.0.weight"].t() + sd[p + "CoreNet.0.bias"])
    core = core @ sd[p + "CoreNet.3.weight"].t() + sd[p + "CoreNet.3.bias"]
    return core + x if c.pre_lnorm else layer_norm(sd, p + "layer_norm", x + core, c.layer_norm_eps)


def forward(sd, c, ids, mems=None):
    """ids [B, L] (batch first, like the model); mems: list of [M, B, C] (the release's layout) or None.
    Returns (hidden [B, L, C], new mems [M', B, C] each)."""
    dec_inp = ids.t()
    qlen, bsz = dec_inp.size()
    word_emb = adaptive_embedding(sd, c, dec_inp)
    mlen = mems[0].size(0) if mems is not None else 0
    klen = mlen + qlen
    all_ones = torch.ones(qlen, klen)
    if c.same_length:
        mask_len = klen - c.mem_len
        mask_shift_len = qlen - mask_len if mask_len > 0 else qlen
        dec_attn_mask = (torch.triu(all_ones, 1 + mlen) + torch.tril(all_ones, -mask_shift_len)).bool()[:, :, None]
    else:
        dec_attn_mask = torch.triu(all_ones, diagonal=1 + mlen).bool()[:, :, None]
    pos_seq = torch.arange(klen - 1, -1, -1.0)
    if c.clamp_len > 0:
        pos_seq.clamp_(max=c.clamp_len)
    inv_freq = 1 / (10000 ** (torch.arange(0.0, c.d_model, 2.0) / c.d_model))
    sinusoid = torch.ger(pos_seq, inv_freq)
    pos_emb = torch.cat([sinusoid.sin(), sinusoid.cos()], dim=-1)[:, None, :]
    core_out = word_emb
    hids = [core_out]
    for i in range(c.n_layer):
        p = f"layers.{i}."
        rw = sd[p + "dec_attn.r_w_bias"] if c.untie_r else sd["r_w_bias"]
        rr = sd[p + "dec_attn.r_r_bias"] if c.untie_r else sd["r_r_bias"]
        core_out = attn(sd, c, p + "dec_attn.", core_out, pos_emb, rw, rr, dec_attn_mask,
                        None if mems is None else mems[i])
        core_out = pos_ff(sd, c, p + "pos_ff.", core_out)
        hids.append(core_out)
    end_idx = mlen + qlen
    beg_idx = max(0, end_idx - c.mem_len)
    new_mems = [(torch.cat([mems[i], hids[i]], 0) if mems is not None else hids[i])[beg_idx:end_idx]
                for i in range(len(hids))]
    return core_out.transpose(0, 1), new_mems


def _logit(hidden, weight, bias, proj):
    if proj is None:
        return F.linear(hidden, weight, bias=bias)
    return F.linear(F.linear(hidden, proj.t().contiguous()), weight, bias=bias)


def adaptive_nll(sd, c, hidden, target):
    """hidden [N, d_model], target [N] -> nll [N] (the release's ProjectedAdaptiveLogSoftmax, placed by index)."""
    cutoffs = list(c.cutoffs) + [c.n_token]
    ends = [0] + cutoffs
    n_clusters = len(cutoffs) - 1

    def proj(i):
        return sd.get(f"crit.out_projs.{i}")

    if n_clusters == 0:
        logit = _logit(hidden, sd["crit.out_layers.0.weight"], sd["crit.out_layers.0.bias"], proj(0))
        return -F.log_softmax(logit, dim=-1).gather(1, target.unsqueeze(1)).squeeze(1)
    weights, biases = [], []
    for i in range(len(cutoffs)):
        if c.div_val == 1:
            l_idx, r_idx = ends[i], ends[i + 1]
            weight_i = sd["crit.out_layers.0.weight"][l_idx:r_idx]
            bias_i = sd["crit.out_layers.0.bias"][l_idx:r_idx]
        else:
            weight_i, bias_i = sd[f"crit.out_layers.{i}.weight"], sd[f"crit.out_layers.{i}.bias"]
        if i == 0:
            weight_i = torch.cat([weight_i, sd["crit.cluster_weight"]], dim=0)
            bias_i = torch.cat([bias_i, sd["crit.cluster_bias"]], dim=0)
        weights.append(weight_i)
        biases.append(bias_i)
    head_logprob = F.log_softmax(_logit(hidden, weights[0], biases[0], proj(0)), dim=1)
    nll = torch.zeros_like(target, dtype=hidden.dtype)
    cutoff_values = [0] + cutoffs
    for i in range(len(cutoff_values) - 1):
        l_idx, r_idx = cutoff_values[i], cutoff_values[i + 1]
        indices_i = ((target >= l_idx) & (target < r_idx)).nonzero().squeeze(1)
        if indices_i.numel() == 0:
            continue
        target_i = target.index_select(0, indices_i) - l_idx
        head_logprob_i = head_logprob.index_select(0, indices_i)
        if i == 0:
            logprob_i = head_logprob_i.gather(1, target_i[:, None]).squeeze(1)
        else:
            tail_logprob_i = F.log_softmax(_logit(hidden.index_select(0, indices_i), weights[i], biases[i], proj(i)),
                                           dim=1)
            logprob_i = head_logprob_i[:, -i] + tail_logprob_i.gather(1, target_i[:, None]).squeeze(1)
        nll = nll.index_copy(0, indices_i, -logprob_i)
    return nll
