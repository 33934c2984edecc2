"""models.blocks against plain-PyTorch statements of the same math (float32, fresh seeded inputs).

Attention: self and cross, GQA, the fused path (AttentionMask) = the additive-bias decode path = a plain
softmax(q k^T) v; the position-bias hook = the same bias given in the mask. MLP: plain and gated, with and
without biases, for several activations. Block: pre- and post-norm, with cross-attention, = the sub-layers
composed by hand.
"""

import pytest
import torch
import torch.nn.functional as F

from ptm_kernels import AttentionMask
from ptm_kernels.nn import LayerNorm

from ._import import model_module

blocks = model_module("blocks")
TOL = 1e-5


def _reference_attention(q, k, v, bias, scale):
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    return torch.softmax(q @ k.transpose(-1, -2) * scale + bias, -1) @ v


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("Lq", [1, 5])
def test_attention_paths_agree(kv_heads, Lq):
    torch.manual_seed(0)
    B, d, H, Lk = 2, 64, 4, 7
    attn = blocks.Attention(d, H, kv_heads, cross=True, kv_size=24).eval()
    x, ctx = torch.randn(B, Lq, d), torch.randn(B, Lk, 24)
    keep = torch.ones(B, Lk, dtype=torch.bool)
    keep[1, 4:] = False  # key padding
    bias = torch.zeros(B, 1, 1, Lk).masked_fill(~keep[:, None, None], float("-inf"))
    kv = attn.project_kv(ctx)
    with torch.no_grad():
        fused = attn(x, AttentionMask.key_padding(mask=keep), kv=kv)
        plain = attn(x, bias.expand(B, 1, Lq, Lk), kv=kv)
        q = attn.q(x).view(B, Lq, H, -1).transpose(1, 2)
        want = attn.out(_reference_attention(q, *kv, bias, (d // H) ** -0.5).transpose(1, 2).reshape(B, Lq, d))
    assert (fused - want).abs().max().item() <= TOL
    assert (plain - want).abs().max().item() <= TOL


def test_self_attention_with_cache_and_position_bias_hook():
    torch.manual_seed(1)
    B, L, d, H = 2, 6, 64, 4
    table = torch.randn(H, 2 * L - 1)
    hooked = blocks.Attention(d, H, 2, position_bias=lambda Lq, Lk: AttentionMask.toeplitz(table)).eval()
    plain = blocks.Attention(d, H, 2).eval()
    plain.load_state_dict(hooked.state_dict())
    x = torch.randn(B, L, d)
    with torch.no_grad():
        a = hooked(x, AttentionMask.causal())
        b = plain(x, AttentionMask.causal() & AttentionMask.toeplitz(table))
        ref = blocks.Attention(d, H, 2).eval()
        ref.load_state_dict(hooked.state_dict())
        q, k, v = ref.qkv(x).view(B, L, 8, -1).transpose(1, 2).split([4, 2, 2], 1)
        rel = torch.arange(L)[:, None] - torch.arange(L)[None, :] + L - 1
        bias = table[:, rel].masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
        want = ref.out(_reference_attention(q, k, v, bias, 16 ** -0.5).transpose(1, 2).reshape(B, L, d))
    assert (a - b).abs().max().item() <= TOL and (a - want).abs().max().item() <= TOL


@pytest.mark.parametrize("layout", [("qkv",), ("q", "kv"), ("qk", "v"), ("q", "k", "v")])
def test_attention_layouts_agree(layout):
    """Every way of fusing the projections computes the same attention: the weights of a three-projection
    Attention, regrouped, give the same output; a context feeds the groups without q."""
    torch.manual_seed(2)
    B, L, S, d, H, Hk = 2, 5, 7, 64, 4, 2
    three = blocks.Attention(d, H, Hk, layout=("q", "k", "v")).eval()
    other = blocks.Attention(d, H, Hk, layout=layout).eval()
    with torch.no_grad():
        for group in layout:
            getattr(other, group).weight.copy_(torch.cat([getattr(three, c).weight for c in group]))
            getattr(other, group).bias.copy_(torch.cat([getattr(three, c).bias for c in group]))
        other.out.load_state_dict(three.out.state_dict())
        x, ctx = torch.randn(B, L, d), torch.randn(B, S, d)
        mask = AttentionMask.causal()
        assert (other(x, mask) - three(x, mask)).abs().max().item() <= TOL
        if layout[0] == "q":  # keys and values from the context (cross-attention)
            want = three(x, None, context=ctx)
            assert (other(x, None, context=ctx) - want).abs().max().item() <= TOL
            assert (other(x, None, kv=other.project_kv(ctx)) - want).abs().max().item() <= TOL
        if layout == ("qk", "v"):  # MobileBERT: values from the context, queries and keys from x
            q, k, _ = (getattr(three, c)(x).view(B, L, -1, 16).transpose(1, 2) for c in "qkv")
            v = three.v(ctx[:, :L]).view(B, L, Hk, 16).transpose(1, 2)
            bias = torch.zeros(L, L).masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
            want = three.out(_reference_attention(q, k, v, bias, 16 ** -0.5).transpose(1, 2).reshape(B, L, d))
            assert (other(x, mask, context=ctx[:, :L]) - want).abs().max().item() <= TOL


def test_attention_layout_errors():
    with pytest.raises(ValueError, match="layout"):
        blocks.Attention(64, 4, layout=("k", "qv"))
    with pytest.raises(ValueError, match="layout"):
        blocks.Attention(64, 4, cross=True, layout=("qkv",))
    fused = blocks.Attention(64, 4)
    x = torch.randn(1, 3, 64)
    with pytest.raises(ValueError, match="kv="):
        fused(x, None, kv=(torch.randn(1, 4, 3, 16), torch.randn(1, 4, 3, 16)))
    with pytest.raises(ValueError, match="project_kv"):
        fused.project_kv(x)
    with pytest.raises(ValueError, match="cross-attention needs"):
        blocks.Attention(64, 4, cross=True)(x, None)


def test_multi_head_attention_is_the_one_attention():
    from ptm_kernels.nn import MultiHeadAttention

    mha = MultiHeadAttention(64, 4, num_kv_heads=2, bias=True)
    assert isinstance(mha, blocks.Attention) and mha.layout == ("q", "k", "v")
    assert set(mha.state_dict()) == {f"{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")}


@pytest.mark.parametrize("bias", [False, True])
def test_gated_mlp_is_the_one_mlp(bias):
    """ptm_kernels.nn.GatedMLP: the one MLP, gated, with LlamaMLP's names (up_proj keeps its bias in the Linear)."""
    from ptm_kernels.nn import GatedMLP

    torch.manual_seed(3)
    gated = GatedMLP(64, 96, act="gelu_tanh", bias=bias)
    assert isinstance(gated, blocks.MLP)
    keys = {f"{p}_proj.{w}" for p in ("gate", "up", "down") for w in (("weight", "bias") if bias else ("weight",))}
    assert set(gated.state_dict()) == keys
    with torch.no_grad():
        for p in gated.parameters():
            p.normal_()
        x = torch.randn(2, 5, 64)
        want = gated.down_proj(F.gelu(gated.gate_proj(x), approximate="tanh") * gated.up_proj(x))
        assert (gated(x) - want).abs().max().item() <= TOL * want.abs().max().item()
    with pytest.raises(ValueError, match="act must be"):
        GatedMLP(64, 96, act="relu")


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu", "silu"])
def test_mlp(gated, bias, act):
    torch.manual_seed(2)
    mlp = blocks.MLP(16, 24, act, gated=gated, bias=bias).eval()
    if bias:
        with torch.no_grad():
            mlp.fc_bias.normal_()
    x = torch.randn(3, 5, 16)
    fn = {"gelu": F.gelu, "gelu_new": lambda t: F.gelu(t, approximate="tanh"), "relu": F.relu, "silu": F.silu}[act]
    up = x @ mlp.fc.weight.t() + (mlp.fc_bias if bias else 0)
    h = fn(mlp.gate(x)) * up if gated else fn(up)
    with torch.no_grad():
        assert (mlp(x) - mlp.proj(h)).abs().max().item() <= TOL


@pytest.mark.parametrize("pre_norm", [True, False], ids=["pre", "post"])
def test_block_with_cross_attention(pre_norm):
    torch.manual_seed(3)
    d = 64
    blk = blocks.Block(blocks.Attention(d, 4), blocks.MLP(d, 48, "gelu"), LayerNorm(d), LayerNorm(d), pre_norm,
                       cross_attn=blocks.Attention(d, 4, cross=True), norm3=LayerNorm(d)).eval()
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, ctx = torch.randn(2, 5, d), torch.randn(2, 7, d)
    mask, cross = AttentionMask.causal(), AttentionMask()
    with torch.no_grad():
        kv = blk.cross_attn.project_kv(ctx)
        y, residual = blk(x, None, mask, cross_kv=kv, cross_mask=cross)
        got = blocks.finish(y, residual)
        ln = [lambda t, n=n: F.layer_norm(t, (d,), n.weight, n.bias, 1e-5) for n in (blk.norm1, blk.norm2, blk.norm3)]
        subs = [lambda t: blk.attn(t, mask), lambda t: blk.cross_attn(t, cross, kv=kv), blk.mlp]
        want = x
        for norm, sub in zip(ln, subs):
            want = want + sub(norm(want)) if pre_norm else norm(want + sub(want))
    assert (got - want).abs().max().item() <= 1e-4  # three sub-layers of float32 rounding, fused vs unfused
