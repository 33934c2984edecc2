"""MASS as the paper describes it, in plain PyTorch (no ptm_kernels): the reference tests/models/test_mass.py
checks models/mass.py against. A post-norm Transformer (Vaswani et al.) with learned positions and an embedding
LayerNorm (XLM), GELU, output layer tied to the embedding plus a bias; the decoder attends causally to itself
and to the unpadded encoder states."""

import math

import torch
import torch.nn.functional as F
from torch import nn


def attention(x, kv, p, prefix, heads, mask):
    """Multi-head attention with separate q, k, v, o projections p[prefix + 'q.weight'] etc.; mask: bool
    [B|1, 1|Lq, Lk] of visible keys."""
    B, Lq, d = x.shape
    D = d // heads

    def proj(t, name):
        return F.linear(t, p[f"{prefix}{name}.weight"], p[f"{prefix}{name}.bias"])

    q = proj(x, "q").view(B, Lq, heads, D).transpose(1, 2)
    k = proj(kv, "k").view(B, -1, heads, D).transpose(1, 2)
    v = proj(kv, "v").view(B, -1, heads, D).transpose(1, 2)
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    s = s.masked_fill(~mask[:, None], float("-inf"))
    y = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, Lq, d)
    return proj(y, "o")


def layer_norm(x, p, name, eps):
    return F.layer_norm(x, x.shape[-1:], p[name + ".weight"], p[name + ".bias"], eps)


def ffn(x, p, prefix):
    h = F.gelu(F.linear(x, p[prefix + "fc1.weight"], p[prefix + "fc1.bias"]))
    return F.linear(h, p[prefix + "fc2.weight"], p[prefix + "fc2.bias"])


def forward(p, c, src, src_mask, tgt, tgt_positions):
    """Logits [B, Lt, V] of the decoder over `tgt` (at positions tgt_positions) given the source."""
    eps = c.layer_norm_eps
    B, Ls = src.shape
    x = p["embed"][src] + p["pos_enc"][torch.arange(Ls)]
    x = layer_norm(x, p, "emb_norm_enc", eps)
    enc_mask = src_mask.bool()[:, None, :]
    for i in range(c.encoder_layers):
        e = f"enc.{i}."
        x = layer_norm(x + attention(x, x, p, e + "attn.", c.encoder_attention_heads, enc_mask), p, e + "ln1", eps)
        x = layer_norm(x + ffn(x, p, e), p, e + "ln2", eps)
    Lt = tgt.shape[1]
    y = p["embed"][tgt] + p["pos_dec"][tgt_positions]
    y = layer_norm(y, p, "emb_norm_dec", eps)
    causal = torch.ones(Lt, Lt, dtype=torch.bool).tril()[None]
    for i in range(c.decoder_layers):
        e = f"dec.{i}."
        y = layer_norm(y + attention(y, y, p, e + "self.", c.decoder_attention_heads, causal), p, e + "ln1", eps)
        y = layer_norm(y + attention(y, x, p, e + "cross.", c.decoder_attention_heads, enc_mask), p, e + "ln2", eps)
        y = layer_norm(y + ffn(y, p, e), p, e + "ln3", eps)
    return y @ p["embed"].t() + p["out_bias"]


def params_from(model):
    """The reference's parameters, as views of models/mass.py's (so gradients can be compared)."""
    s = dict(model.named_parameters())
    s.update(dict(model.named_buffers()))
    p = {"embed": s["shared.weight"], "pos_enc": s["encoder_positions.weight"],
         "pos_dec": s["decoder_positions.weight"], "out_bias": s["final_logits_bias"][0]}
    for side in ("enc", "dec"):
        long = "encoder" if side == "enc" else "decoder"
        for w in ("weight", "bias"):
            p[f"emb_norm_{side}.{w}"] = s[f"{long}_embed_norm.{w}"]

    def split(prefix, name_ours, names, w):
        for n, t in zip(names, s[f"{prefix}.{name_ours}.{w}"].chunk(len(names))):
            yield n, t

    for side, n in (("enc", model.config.encoder_layers), ("dec", model.config.decoder_layers)):
        long = "encoder" if side == "enc" else "decoder"
        for i in range(n):
            a, e = f"{long}_layers.{i}", f"{side}.{i}."
            attn = [("attn.", "attn")] if side == "enc" else [("self.", "attn"), ("cross.", "cross_attn")]
            for w in ("weight", "bias"):
                for ref, ours in attn:
                    if ours == "cross_attn":
                        p[f"{e}{ref}q.{w}"] = s[f"{a}.{ours}.q.{w}"]
                        for nm, t in split(f"{a}.{ours}", "kv", "kv", w):
                            p[f"{e}{ref}{nm}.{w}"] = t
                    else:
                        for nm, t in split(f"{a}.{ours}", "qkv", "qkv", w):
                            p[f"{e}{ref}{nm}.{w}"] = t
                    p[f"{e}{ref}o.{w}"] = s[f"{a}.{ours}.out.{w}"]
                p[f"{e}fc1.{w}"] = s[f"{a}.mlp.fc.weight" if w == "weight" else f"{a}.mlp.fc_bias"]
                p[f"{e}fc2.{w}"] = s[f"{a}.mlp.proj.{w}"]
                for j in range(2 if side == "enc" else 3):
                    p[f"{e}ln{j + 1}.{w}"] = s[f"{a}.norm{j + 1}.{w}"]
    return p
