"""MASS (Song et al., 2019): a standard post-norm Transformer encoder-decoder (XLM's: learned positions, an
embedding LayerNorm, GELU, a tied output layer with a bias), pre-trained by masking one contiguous fragment of
the encoder input and predicting it with the decoder (`noising.mass_fragment_mask`): the decoder input is the
fragment shifted right behind a mask token, at the fragment's own positions.

    ex = mass_fragment_mask(tokens, mask_id, vocab_size)
    out = model(ex.encoder_input[None], decoder_input_ids=ex.decoder_input[None],
                decoder_position_ids=ex.decoder_positions[None], labels=ex.labels[None])

transformers has no MASS; tests/models/mass_reference.py is the plain-PyTorch transcription it is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass

from .bart import BartConfig, TransformerSeq2Seq
from .noising import mass_fragment_mask  # noqa: F401  (MASS's pre-training corruption)


@dataclass
class MassConfig(BartConfig):
    vocab_size: int = 64000
    d_model: int = 1024
    encoder_layers: int = 6
    decoder_layers: int = 6
    encoder_attention_heads: int = 8
    decoder_attention_heads: int = 8
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 2
    eos_token_id: int = 1
    decoder_start_token_id: int = 1
    mask_token_id: int = 5


class Mass(TransformerSeq2Seq):
    """The MASS encoder-decoder LM (no transformers twin: no from_hf / to_hf)."""

    config_class = MassConfig
    pre_norm = False
    sinusoidal = False
    position_offset = 0
    embed_norm = True
    final_norm = False
