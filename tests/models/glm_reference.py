"""GLM (Du et al., 2021) transcribed from the paper in plain PyTorch: the independent reference for models/glm.py.

Section 2.1-2.3: input x = [x_corrupt (part A); spans with [S] (part B)]; self-attention mask: A attends
to A, B attends to A and to its own past (Figure 2(d)); 2D positional ids added as two learned embeddings;
Transformer with the layer norm rearranged before each sub-layer (Megatron), GELU, output through the word
embeddings. Weights are read from a state dict with models/glm.py's names, so the two share weights.
"""

import math

import torch
import torch.nn.functional as F


def dense_glm_mask(prefix_lengths, L):
    """bool [B, L, L] per Figure 2(d): query i sees key j iff j is in part A, or j is in B with j <= i."""
    B = len(prefix_lengths)
    mask = torch.zeros(B, L, L, dtype=torch.bool)
    for b, a in enumerate(prefix_lengths.tolist()):
        mask[b, :, :a] = True  # everybody sees part A (A queries see only A: the B columns stay False)
        mask[b, a:, a:] = torch.ones(L - a, L - a, dtype=torch.bool).tril()  # B sees its own past
    return mask


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def glm_forward(sd, cfg, input_ids, position_ids, prefix_lengths):
    """Logits [B, L, V]; sd: the model's state dict (parameters may require grad)."""
    B, L = input_ids.shape
    H, d = cfg.num_heads, cfg.hidden_size
    Dh = d // H
    eps = cfg.layer_norm_epsilon
    h = sd["wte.weight"][input_ids] + sd["wpe.weight"][position_ids[:, 0]] + sd["wbpe.weight"][position_ids[:, 1]]
    mask = dense_glm_mask(prefix_lengths, L)[:, None]  # [B, 1, L, L]
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        x = layer_norm(h, sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        qkv = x @ sd[p + "attn.qkv.weight"].t() + sd[p + "attn.qkv.bias"]
        q, k, v = (t.reshape(B, L, H, Dh).transpose(1, 2) for t in qkv.split(d, -1))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(Dh)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        a = (probs @ v).transpose(1, 2).reshape(B, L, d)
        h = h + a @ sd[p + "attn.out.weight"].t() + sd[p + "attn.out.bias"]
        x = layer_norm(h, sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        m = gelu_tanh(x @ sd[p + "mlp.fc.weight"].t() + sd[p + "mlp.fc_bias"])
        h = h + m @ sd[p + "mlp.proj.weight"].t() + sd[p + "mlp.proj.bias"]
    h = layer_norm(h, sd["norm.weight"], sd["norm.bias"], eps)
    return h @ sd["wte.weight"].t()
