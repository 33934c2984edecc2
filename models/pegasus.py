"""Pegasus (Zhang et al., 2019): BART's layout made pre-norm, with sinusoidal positions (no embedding
LayerNorm), token embeddings scaled by sqrt(d_model), and a LayerNorm at the end of each stack.

    model = Pegasus.from_hf(hf_model)                    # PegasusForConditionalGeneration's weights
"""

from __future__ import annotations

from dataclasses import dataclass

from .bart import BartConfig, TransformerSeq2Seq


@dataclass
class PegasusConfig(BartConfig):
    vocab_size: int = 96103
    max_position_embeddings: int = 512
    activation_function: str = "relu"
    scale_embedding: bool = True
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0


class Pegasus(TransformerSeq2Seq):
    """PegasusForConditionalGeneration."""

    config_class = PegasusConfig
    hf_class, hf_config_class = "PegasusForConditionalGeneration", "PegasusConfig"
    hf_derived = ("embed_positions.weight",)  # the sinusoid table, a buffer here

    pre_norm = True
    sinusoidal = True
    embed_norm = False
    final_norm = True
