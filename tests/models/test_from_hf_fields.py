"""`from_hf` honours or refuses every config field that changes the math, for each transformers config class
the project converts.

For each config class, every field of its `to_dict()` is classified here (the completeness test fails when
transformers adds one): HONOURED fields get non-default values, one at a time, and our model's outputs must match
transformers' on them (XLNet: on a second segment too, over the first one's memory; pad_token_id: also the
embeddings' padding rows, which get no gradient); REFUSED values must make `from_hf` raise an error that names the
field; NOT_MATH fields are listed with the reason they cannot change the converted model's eval outputs
(training-only randomness, initialisation, generation or tokenizer ids, heads of other classes); the dropout
probabilities among them must still reach our model. A field may be honoured for some values and refused for
others (an activation name the table lacks).

Also here: an HF tensor that the conversion does not read is refused, naming it; the dtype is kept.

Tiny configs (hidden 32, 2 layers, vocab 99) keep the whole table at a few seconds on one core.
"""

from dataclasses import dataclass, field
from typing import Dict, List

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ._import import model_module  # noqa: E402

TOL = 1e-4  # both sides float32, each ~1e-5 relative from the truth; logits here are O(1) (as parity.TOL)
V = 99  # vocab of the tiny configs

# The fields every transformers config has (PretrainedConfig), none of which changes a forward pass
COMMON_NOT_MATH = {
    "_name_or_path": "where the config was loaded from",
    "architectures": "metadata: the class names it was saved from",
    "chunk_size_feed_forward": "transformers computes the FFN in chunks of tokens: the same numbers",
    "dtype": "the weights' dtype: from_hf keeps it (test_from_hf_keeps_the_dtype)",
    "id2label": "label names (their count is num_labels, used by the classification heads)",
    "label2id": "label names",
    "is_encoder_decoder": "fixed by the model class",
    "model_type": "fixed by the config class (Llama.from_hf reads it to pick llama / mistral / qwen2)",
    "output_attentions": "what is returned, not how it is computed",
    "output_hidden_states": "what is returned, not how it is computed",
    "problem_type": "the loss of the sequence classifiers only (they refuse all but single-label)",
    "return_dict": "what is returned, not how it is computed",
    "transformers_version": "metadata",
}

DROPOUT = "dropout probability: identity in eval; honoured in training (read by from_hf, see the gradient tests)"
INIT = "initialisation only: the weights come from the HF model"
GEN_IDS = "token ids of generation / tokenization: not read by a forward pass over given ids"
OTHER_HEAD = "read only by a head of another class (sequence summary, classification, multiple choice, QA beams)"
CACHE = "whether a decoding cache is returned: the same numbers"

BERT_NOT_MATH = {
    "hidden_dropout_prob": DROPOUT, "attention_probs_dropout_prob": DROPOUT, "classifier_dropout": DROPOUT,
    "initializer_range": INIT, "use_cache": CACHE, "bos_token_id": GEN_IDS, "eos_token_id": GEN_IDS,
}
BERT_HONOURED = {
    "vocab_size": [120], "hidden_size": [64], "num_hidden_layers": [3], "num_attention_heads": [1],
    "intermediate_size": [48], "hidden_act": ["relu", "gelu_new", "silu", "quick_gelu", "tanh"],
    "max_position_embeddings": [40], "type_vocab_size": [3], "layer_norm_eps": [1e-2], "pad_token_id": [3],
}
BERT_REFUSED = {"hidden_act": ["mish"], "is_decoder": [True], "add_cross_attention": [True],
                "tie_word_embeddings": [False]}
ELECTRA_NOT_MATH = {**BERT_NOT_MATH, "summary_type": OTHER_HEAD, "summary_use_proj": OTHER_HEAD,
                    "summary_activation": OTHER_HEAD, "summary_last_dropout": OTHER_HEAD}
BERT_COMPANIONS = {"add_cross_attention": {"is_decoder": True}}  # transformers refuses cross-attention in an encoder
BERT_BASE = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                 max_position_embeddings=24)
DECODER_BASE = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                    intermediate_size=37,
                    max_position_embeddings=32, bos_token_id=None, eos_token_id=None, pad_token_id=None)
LLAMA_NOT_MATH = {"initializer_range": INIT, "use_cache": CACHE, "bos_token_id": GEN_IDS, "eos_token_id": GEN_IDS,
                  "attention_dropout": DROPOUT}
LLAMA_HONOURED = {
    "vocab_size": [120], "hidden_size": [64], "intermediate_size": [48], "num_hidden_layers": [3],
    "num_attention_heads": [1], "num_key_value_heads": [2], "head_dim": [32],
    "hidden_act": ["gelu", "gelu_pytorch_tanh", "relu"], "max_position_embeddings": [40], "rms_norm_eps": [1e-2],
    "rope_parameters": [{"rope_type": "default", "rope_theta": 50.0},
                        {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0},
                        {"rope_type": "llama3", "rope_theta": 50.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8}],
    "tie_word_embeddings": [True],
    "pad_token_id": [3],
}
LLAMA_REFUSED = {"hidden_act": ["mish"], "rope_parameters": [{"rope_type": "longrope", "rope_theta": 1e4,
                                                              "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                                              "original_max_position_embeddings": 16}]}
S2S_BASE = dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=32,
                forced_eos_token_id=None)
BART_NOT_MATH = {
    "dropout": DROPOUT, "attention_dropout": DROPOUT, "activation_dropout": DROPOUT, "classifier_dropout": OTHER_HEAD,
    "init_std": INIT, "use_cache": CACHE, "bos_token_id": GEN_IDS, "eos_token_id": GEN_IDS,
    "forced_eos_token_id": GEN_IDS, "decoder_start_token_id": GEN_IDS + " (decoder_input_ids are given here)",
    "is_decoder": "fixed by the class (ForConditionalGeneration builds both stacks)",
}
BART_HONOURED = {
    "vocab_size": [120], "d_model": [64], "encoder_layers": [1], "decoder_layers": [3],
    "encoder_attention_heads": [1], "decoder_attention_heads": [1], "encoder_ffn_dim": [48], "decoder_ffn_dim": [24],
    "activation_function": ["relu", "gelu_new", "silu"], "max_position_embeddings": [40], "scale_embedding": [True],
    "pad_token_id": [3],
}
BART_REFUSED = {"activation_function": ["mish"], "encoder_layerdrop": [0.5], "decoder_layerdrop": [0.5],
                "tie_word_embeddings": [False]}


@dataclass
class Family:
    config: str  # transformers config class
    hf_model: str  # the transformers class converted
    module: str  # models/<module>.py
    ours: str  # our class
    base: dict  # the tiny config every case starts from
    kind: str  # "encoder", "decoder" or "seq2seq": the inputs
    output: str  # the output compared (same name on both sides)
    honoured: Dict[str, list]
    refused: Dict[str, list]
    not_math: Dict[str, str]
    # fields transformers accepts only together with others: field -> the others' values
    companions: Dict[str, dict] = field(default_factory=dict)

    def make_hf(self, name, value):
        change = {**self.companions.get(name, {}), name: value}
        return getattr(transformers, self.hf_model)(getattr(transformers, self.config)(**{**self.base, **change}))

    def ours_class(self):
        return getattr(model_module(self.module), self.ours)


REFORMER_BASE = dict(vocab_size=V, hidden_size=32, num_attention_heads=2, attention_head_size=16,
                     attn_layers=["local", "lsh"], axial_pos_shape=[4, 8], axial_pos_embds_dim=[8, 24],
                     max_position_embeddings=32, feed_forward_size=37, local_attn_chunk_length=4,
                     lsh_attn_chunk_length=8, num_buckets=4, num_hashes=2, hash_seed=7, is_decoder=True)
REFORMER_HONOURED = {
    "vocab_size": [120], "hidden_size": [64], "attention_head_size": [32], "num_attention_heads": [1, 3],
    "attn_layers": [["lsh", "lsh"], ["local", "local"], ["lsh", "local", "lsh"]], "num_hidden_layers": [1],
    "axial_pos_embds": [False], "axial_pos_shape": [[8, 4]], "axial_pos_embds_dim": [[16, 16]],
    "max_position_embeddings": [24], "feed_forward_size": [40], "hidden_act": ["gelu", "gelu_new", "silu"],
    "layer_norm_eps": [1e-2], "local_attn_chunk_length": [2, 8], "local_num_chunks_before": [0, 2],
    "lsh_attn_chunk_length": [4, 16], "lsh_num_chunks_before": [0, 2], "num_hashes": [1, 3],
    "num_buckets": [2, [2, 4], None], "hash_seed": [3], "pad_token_id": [3],
}
REFORMER_NOT_MATH = {
    "hidden_dropout_prob": DROPOUT, "local_attention_probs_dropout_prob": DROPOUT,
    "lsh_attention_probs_dropout_prob": DROPOUT, "classifier_dropout": OTHER_HEAD, "initializer_range": INIT,
    "axial_norm_std": INIT, "eos_token_id": GEN_IDS, "bos_token_id": GEN_IDS, "use_cache": CACHE,
    "chunk_size_lm_head": "transformers computes the LM head in chunks of tokens: the same numbers",
    "tie_word_embeddings": "transformers ties nothing here: the head reads 2 * hidden_size features",
    "is_decoder": "fixed by the class: ReformerModelWithLMHead requires True (the encoder: test_reformer.py)",
    "local_num_chunks_after": "ReformerModelWithLMHead requires 0 (the encoder takes 1: test_reformer.py)",
    "lsh_num_chunks_after": "ReformerModelWithLMHead requires 0 (the encoder takes 1: test_reformer.py)",
}

FAMILIES: List[Family] = [
    Family("BertConfig", "BertForMaskedLM", "bert", "BertForMaskedLM", BERT_BASE, "encoder", "logits",
           BERT_HONOURED, BERT_REFUSED, BERT_NOT_MATH, BERT_COMPANIONS),
    Family("RobertaConfig", "RobertaForMaskedLM", "roberta", "RobertaForMaskedLM", {**BERT_BASE, "pad_token_id": 1},
           "encoder", "logits", BERT_HONOURED, BERT_REFUSED, BERT_NOT_MATH, BERT_COMPANIONS),
    Family("ElectraConfig", "ElectraForMaskedLM", "electra", "ElectraForMaskedLM",  # the generator: a tied head
           {**BERT_BASE, "embedding_size": 16}, "encoder", "logits",
           {**BERT_HONOURED, "embedding_size": [32, 24]}, BERT_REFUSED, ELECTRA_NOT_MATH, BERT_COMPANIONS),
    Family("ElectraConfig", "ElectraForPreTraining", "electra", "ElectraForPreTraining",  # its head reads hidden_act
           {**BERT_BASE, "embedding_size": 16}, "encoder", "logits",
           {**BERT_HONOURED, "embedding_size": [32, 24]},
           {k: v for k, v in BERT_REFUSED.items() if k != "tie_word_embeddings"},
           {**ELECTRA_NOT_MATH, "tie_word_embeddings": "the discriminator has no head tied to the embeddings"},
           BERT_COMPANIONS),
    Family("AlbertConfig", "AlbertForMaskedLM", "albert", "AlbertForMaskedLM",
           {**BERT_BASE, "embedding_size": 16}, "encoder", "logits",
           {**BERT_HONOURED, "hidden_act": ["gelu", "relu", "silu"],  # (ALBERT's default is gelu_new)
            "embedding_size": [24], "num_hidden_groups": [2], "inner_group_num": [2]},
           {"hidden_act": ["mish"], "tie_word_embeddings": [False]},
           {k: v for k, v in {**BERT_NOT_MATH, "classifier_dropout_prob": DROPOUT}.items()
            if k not in ("use_cache", "classifier_dropout")}),
    Family("DistilBertConfig", "DistilBertForMaskedLM", "distilbert", "DistilBertForMaskedLM",
           dict(vocab_size=V, dim=32, n_layers=2, n_heads=2, hidden_dim=37, max_position_embeddings=24),
           "encoder", "logits",
           {"vocab_size": [120], "dim": [64], "n_layers": [3], "n_heads": [1], "hidden_dim": [48],
            "activation": ["relu", "gelu_new"], "max_position_embeddings": [40], "sinusoidal_pos_embds": [True],
            "pad_token_id": [3]},
           {"activation": ["mish"], "tie_word_embeddings": [False]},
           {"dropout": DROPOUT, "attention_dropout": DROPOUT, "qa_dropout": DROPOUT, "seq_classif_dropout": DROPOUT,
            "initializer_range": INIT, "bos_token_id": GEN_IDS, "eos_token_id": GEN_IDS}),
    Family("ErnieConfig", "ErnieForMaskedLM", "ernie", "ErnieForMaskedLM", BERT_BASE, "encoder", "logits",
           {**BERT_HONOURED, "use_task_id": [True], "task_type_vocab_size": [5]}, BERT_REFUSED, BERT_NOT_MATH,
           {**BERT_COMPANIONS, "task_type_vocab_size": {"use_task_id": True}}),
    Family("MobileBertConfig", "MobileBertForMaskedLM", "mobilebert", "MobileBertForMaskedLM",
           dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                max_position_embeddings=24, embedding_size=16, intra_bottleneck_size=32, num_feedforward_networks=2),
           "encoder", "logits",
           {"vocab_size": [120], "hidden_size": [64], "num_hidden_layers": [3], "num_attention_heads": [1],
            "intermediate_size": [48], "hidden_act": ["gelu", "gelu_new", "silu"], "max_position_embeddings": [40],
            "type_vocab_size": [3], "layer_norm_eps": [1e-2], "pad_token_id": [3], "embedding_size": [24],
            "trigram_input": [False], "use_bottleneck": [False], "intra_bottleneck_size": [64],
            "use_bottleneck_attention": [True], "key_query_shared_bottleneck": [False],
            "num_feedforward_networks": [1, 3], "normalization_type": ["layer_norm"]},
           {"hidden_act": ["mish"], "tie_word_embeddings": [False]},
           {"hidden_dropout_prob": DROPOUT, "attention_probs_dropout_prob": DROPOUT, "classifier_dropout": DROPOUT,
            "initializer_range": INIT, "classifier_activation": "the pooler's tanh: MaskedLM has no pooler",
            "true_hidden_size": "derived by the config from use_bottleneck and intra_bottleneck_size"}),
    Family("XLMConfig", "XLMWithLMHeadModel", "xlm", "XLMWithLMHeadModel",
           dict(vocab_size=V, emb_dim=32, n_layers=2, n_heads=2, max_position_embeddings=24, n_langs=2), "encoder",
           "logits",
           {"vocab_size": [120], "emb_dim": [64], "n_layers": [3], "n_heads": [1], "gelu_activation": [False],
            "sinusoidal_embeddings": [True], "causal": [True], "n_langs": [3], "use_lang_emb": [False],
            "max_position_embeddings": [40], "layer_norm_eps": [1e-2], "pad_token_id": [3]},
           {"asm": [True], "tie_word_embeddings": [False]},
           {"is_encoder": "transformers refuses False itself (XLM can only be used as an encoder); so does from_hf",
            "dropout": DROPOUT, "attention_dropout": DROPOUT, "embed_init_std": INIT, "init_std": INIT,
            "unk_index": GEN_IDS, "mask_index": GEN_IDS, "mask_token_id": GEN_IDS, "lang_id": GEN_IDS,
            "bos_token_id": GEN_IDS, "eos_token_id": GEN_IDS, "summary_type": OTHER_HEAD,
            "summary_use_proj": OTHER_HEAD, "summary_activation": OTHER_HEAD, "summary_proj_to_labels": OTHER_HEAD,
            "summary_first_dropout": OTHER_HEAD, "start_n_top": OTHER_HEAD, "end_n_top": OTHER_HEAD},
           {"asm": {"asm_cutoffs": [8, 20], "asm_div_value": 4.0}}),
    Family("XLNetConfig", "XLNetLMHeadModel", "xlnet", "XLNetLMHeadModel",
           dict(vocab_size=V, d_model=32, n_layer=2, n_head=2, d_inner=37), "xlnet", "logits",
           {"vocab_size": [120], "d_model": [64], "n_layer": [3], "n_head": [1], "d_inner": [48],
            "ff_activation": ["relu", "gelu_new", "silu"], "attn_type": ["uni"], "layer_norm_eps": [1e-2],
            "bi_data": [True], "clamp_len": [3], "same_length": [True], "mem_len": [4], "reuse_len": [3],
            "use_mems_eval": [False], "use_mems_train": [True]},
           {"ff_activation": ["mish"], "tie_word_embeddings": [False]},
           {"dropout": DROPOUT, "initializer_range": INIT, "summary_type": OTHER_HEAD, "summary_use_proj": OTHER_HEAD,
            "summary_activation": OTHER_HEAD, "summary_last_dropout": OTHER_HEAD, "start_n_top": OTHER_HEAD,
            "end_n_top": OTHER_HEAD, "pad_token_id": GEN_IDS, "bos_token_id": GEN_IDS, "eos_token_id": GEN_IDS,
            "d_head": "derived by the config: d_model // n_head (it refuses another value)"}),
    Family("GPT2Config", "GPT2LMHeadModel", "gpt2", "GPT2",
           dict(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=None, eos_token_id=None),
           "decoder", "logits",
           {"vocab_size": [120], "n_positions": [40], "n_embd": [64], "n_layer": [3], "n_head": [1], "n_inner": [48],
            "activation_function": ["gelu", "relu", "silu"], "layer_norm_epsilon": [1e-2],
            "tie_word_embeddings": [False]},
           {"activation_function": ["mish"], "scale_attn_weights": [False], "scale_attn_by_inverse_layer_idx": [True],
            "reorder_and_upcast_attn": [True], "add_cross_attention": [True]},
           {"resid_pdrop": DROPOUT, "embd_pdrop": DROPOUT, "attn_pdrop": DROPOUT, "initializer_range": INIT,
            "summary_type": OTHER_HEAD, "summary_use_proj": OTHER_HEAD, "summary_activation": OTHER_HEAD,
            "summary_proj_to_labels": OTHER_HEAD, "summary_first_dropout": OTHER_HEAD, "use_cache": CACHE,
            "bos_token_id": GEN_IDS, "eos_token_id": GEN_IDS,
            "pad_token_id": "GPT-2's embedding has no padding row: a generation id only"}),
    Family("OpenAIGPTConfig", "OpenAIGPTLMHeadModel", "gpt", "GPT",
           dict(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=32), "decoder", "logits",
           {"vocab_size": [120], "n_positions": [40], "n_embd": [64], "n_layer": [3], "n_head": [1],
            "afn": ["relu", "silu", "swish"], "layer_norm_epsilon": [1e-2]},
           {"tie_word_embeddings": [False]},
           {"resid_pdrop": DROPOUT, "embd_pdrop": DROPOUT, "attn_pdrop": DROPOUT, "initializer_range": INIT,
            "summary_type": OTHER_HEAD, "summary_use_proj": OTHER_HEAD, "summary_activation": OTHER_HEAD,
            "summary_proj_to_labels": OTHER_HEAD, "summary_first_dropout": OTHER_HEAD,
            "bos_token_id": GEN_IDS, "eos_token_id": GEN_IDS, "pad_token_id": GEN_IDS}),
    Family("GPTNeoConfig", "GPTNeoForCausalLM", "gpt3", "GPT3",
           dict(vocab_size=V, hidden_size=32, num_layers=2, num_heads=2, max_position_embeddings=32,
                attention_types=[[["global", "local"], 1]], window_size=4, bos_token_id=None, eos_token_id=None),
           "decoder", "logits",
           {"vocab_size": [120], "max_position_embeddings": [40], "hidden_size": [64], "num_heads": [1],
            "intermediate_size": [48], "window_size": [7], "attention_types": [[[["local", "global"], 1]]],
            "activation_function": ["gelu", "relu"], "layer_norm_epsilon": [1e-2], "num_layers": [4],
            "tie_word_embeddings": [False]},
           {"activation_function": ["mish"]},
           {"resid_dropout": DROPOUT, "embed_dropout": DROPOUT, "attention_dropout": DROPOUT,
            "classifier_dropout": OTHER_HEAD, "initializer_range": INIT, "use_cache": CACHE, "bos_token_id": GEN_IDS,
            "eos_token_id": GEN_IDS, "pad_token_id": "GPT-Neo's embedding has no padding row: a generation id only",
            "attention_layers": "derived from attention_types by the config (set it through attention_types)"},
           {"num_layers": {"attention_types": [[["global", "local"], 2]]}}),
    Family("LlamaConfig", "LlamaForCausalLM", "llama", "Llama", DECODER_BASE, "decoder", "logits",
           {**LLAMA_HONOURED, "attention_bias": [True], "mlp_bias": [True]}, LLAMA_REFUSED,
           {**LLAMA_NOT_MATH, "pretraining_tp": "not read by transformers 5's LLaMA (it was a slicing of the "
                                               "same matmuls)"}),
    Family("MistralConfig", "MistralForCausalLM", "llama", "Llama", {**DECODER_BASE, "sliding_window": None},
           "decoder", "logits", {**LLAMA_HONOURED, "sliding_window": [4, 16]}, LLAMA_REFUSED, LLAMA_NOT_MATH),
    Family("Qwen2Config", "Qwen2ForCausalLM", "llama", "Llama",
           {**DECODER_BASE, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
           "decoder", "logits",
           {**{k: v for k, v in LLAMA_HONOURED.items() if k != "head_dim"},  # (Qwen2 has no head_dim)
            "use_sliding_window": [False], "sliding_window": [6], "max_window_layers": [0, 2],
            "layer_types": [["sliding_attention", "full_attention"]]},
           LLAMA_REFUSED, LLAMA_NOT_MATH),
    Family("T5Config", "T5ForConditionalGeneration", "t5", "T5",
           dict(vocab_size=V, d_model=32, d_kv=16, d_ff=37, num_layers=2, num_heads=2,
                relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0),
           "seq2seq", "logits",
           {"vocab_size": [120], "d_model": [64], "d_kv": [32], "d_ff": [48], "num_layers": [3],
            "num_decoder_layers": [1], "num_heads": [4], "relative_attention_num_buckets": [4],
            "relative_attention_max_distance": [32], "layer_norm_epsilon": [1e-2],
            "feed_forward_proj": ["gated-gelu", "gated-relu", "gated-silu", "gelu", "silu", "gated-gelu_new"],
            "tie_word_embeddings": [False]},
           {"feed_forward_proj": ["gated-mish"]},
           {"dropout_rate": DROPOUT, "classifier_dropout": OTHER_HEAD, "initializer_factor": INIT, "use_cache": CACHE,
            "pad_token_id": GEN_IDS + " (decoder_input_ids are given here)", "eos_token_id": GEN_IDS,
            "decoder_start_token_id": GEN_IDS + " (decoder_input_ids are given here)",
            "is_decoder": "fixed by the class (ForConditionalGeneration builds both stacks)",
            "dense_act_fn": "derived from feed_forward_proj by the config (from_hf checks they agree)",
            "is_gated_act": "derived from feed_forward_proj by the config (from_hf checks they agree)",
            "scale_decoder_outputs": "derived from tie_word_embeddings by the config (honoured there)"}),
    Family("BartConfig", "BartForConditionalGeneration", "bart", "Bart", S2S_BASE, "seq2seq", "logits",
           BART_HONOURED, BART_REFUSED, BART_NOT_MATH),
    Family("PegasusConfig", "PegasusForConditionalGeneration", "pegasus", "Pegasus", {**S2S_BASE, "pad_token_id": 0},
           "seq2seq", "logits", BART_HONOURED, BART_REFUSED,
           {k: v for k, v in BART_NOT_MATH.items() if k not in ("classifier_dropout", "bos_token_id")}),
    Family("ReformerConfig", "ReformerModelWithLMHead", "reformer", "ReformerModelWithLMHead", REFORMER_BASE,
           "decoder", "logits", REFORMER_HONOURED, {"hidden_act": ["mish"]}, REFORMER_NOT_MATH,
           {"hidden_size": {"axial_pos_embds_dim": [16, 48]}, "num_hidden_layers": {"attn_layers": ["local", "lsh"]},
            "axial_pos_embds": {"max_position_embeddings": 32}}),
]


def _cases():
    for fam in FAMILIES:
        for expect, table in (("honour", fam.honoured), ("refuse", fam.refused)):
            for name, values in table.items():
                for i, value in enumerate(values):
                    yield pytest.param(fam, name, value, expect, id=f"{fam.hf_model}-{name}-{i}-{expect}")


def _perturbed(hf):
    """transformers' initial weights are small (std 0.02), norms 1 and biases 0: on them attention is nearly
    uniform and every GELU nearly linear, so a wrong head count or activation would hardly show. Random
    weights of std ~0.2 around the initial ones make every field's effect visible. (Frozen tables, Pegasus'
    sinusoids, stay as they are: they are computed, not weights.)"""
    with torch.no_grad():
        for p in hf.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    return hf.eval()


def _inputs(fam: Family, hf):
    """A padded batch (rows of lengths L and L - 4; pad id at the padding) for the family's kind."""
    c = hf.config
    L = 20 if fam.kind == "decoder" else 10
    ids = torch.randint(5, V, (2, L))
    real = torch.ones(2, L, dtype=torch.long)
    if fam.kind == "xlnet":  # transformers' XLNet fails on attn_type="uni" with any attention_mask (test_xlnet pads)
        return dict(input_ids=ids), real.bool()
    real[1, L - 4:] = 0
    pad = getattr(c, "pad_token_id", None)
    ids = ids.masked_fill(~real.bool(), 0 if pad is None else pad)
    inputs = dict(input_ids=ids, attention_mask=real)
    if fam.kind == "encoder" and getattr(c, "type_vocab_size", 0):
        inputs["token_type_ids"] = (torch.arange(L) >= L // 2).long().expand(2, L) * real
    if fam.config == "XLMConfig":  # two languages, so that the language embeddings matter
        inputs["langs"] = (torch.arange(L) >= L // 2).long().expand(2, L)
    if fam.kind == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(5, V, (2, 7))
    return inputs, real.bool()


def _compare(fam: Family, hf, ours):
    inputs, real = _inputs(fam, hf)
    with torch.no_grad():
        theirs, mine = hf(**inputs), ours.eval()(**inputs)
        if fam.kind == "xlnet":  # a second segment on the memory of the first (mem_len, reuse_len, same_length, ...)
            assert (mine.mems is None) == (theirs.mems is None), "mems returned by one side only"
            if mine.mems is not None:
                for a, b in zip(mine.mems, theirs.mems):  # ours batch first, transformers' time first
                    assert (a - b.transpose(0, 1)).abs().max().item() < TOL, "mems differ"
                second = torch.randint(5, V, inputs["input_ids"].shape)
                theirs = hf(second, mems=theirs.mems)
                mine = ours(second, mems=mine.mems)
    theirs, mine = getattr(theirs, fam.output), getattr(mine, fam.output)
    if fam.kind != "seq2seq":  # per-token outputs: the real positions
        theirs, mine = theirs[real], mine[real]
    diff = (mine.float() - theirs.float()).abs().max().item()
    assert diff < TOL, f"logits differ by {diff}"


@pytest.mark.parametrize("fam,name,value,expect", list(_cases()))
def test_field_is_honoured_or_refused(fam, name, value, expect):
    hf = _perturbed(fam.make_hf(name, value))
    if expect == "refuse":
        with pytest.raises((NotImplementedError, ValueError, KeyError)) as err:
            fam.ours_class().from_hf(hf)
        assert name in str(err.value), f"the error does not name {name}: {err.value}"
    else:
        ours = fam.ours_class().from_hf(hf)
        _compare(fam, hf, ours)
        if name == "pad_token_id":  # beyond the forward pass: the padding row of an embedding gets no gradient
            assert _padding_rows(hf) <= _padding_rows(ours), "an embedding's padding row is not the HF model's"


def _padding_rows(model) -> set:
    return {(m.num_embeddings, m.padding_idx) for m in model.modules()
            if isinstance(m, torch.nn.Embedding) and m.padding_idx is not None}


@pytest.mark.parametrize("fam", FAMILIES, ids=[f.hf_model for f in FAMILIES])
def test_every_config_field_is_classified(fam):
    """Each field of the config class is honoured, refused or stated not to change the math (with a reason)."""
    fields = set(getattr(transformers, fam.config)(**fam.base).to_dict())
    fields -= set(COMMON_NOT_MATH)
    classified = set(fam.honoured) | set(fam.refused) | set(fam.not_math)
    assert not set(fam.not_math) & (set(fam.honoured) | set(fam.refused))
    assert fields - classified == set(), "fields nobody classified"
    assert classified - fields == set(), "classified fields the config does not have"
    assert all(isinstance(why, str) and why for why in fam.not_math.values())


# ------------------------------------------------------------------------------- tensors and dtype

def _family(config: str) -> Family:
    return next(f for f in FAMILIES if f.config == config)


@pytest.mark.parametrize("config", ["LlamaConfig", "BertConfig", "T5Config", "Qwen2Config"])
def test_a_tensor_nothing_reads_is_refused(config):
    """An HF tensor that the conversion does not read would be a part of the model that ours does not run (as
    Qwen2's q/k/v biases were under LLaMA's mapping): from_hf names it."""
    fam = _family(config)
    hf = fam.make_hf("vocab_size", V)
    name, module = [(n, m) for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear)][1]
    module.register_parameter("scale", torch.nn.Parameter(torch.randn(3)))
    with pytest.raises(KeyError, match=f"{name}.scale"):
        fam.ours_class().from_hf(hf)


def test_derived_buffers_of_older_checkpoints_are_passed_over():
    """Buffers older transformers saved that are computed, not weights (GPT-2's causal tril and -1e4, rotary
    frequencies) are no tensors 'nothing reads': the conversion passes them over."""
    gpt2 = _family("GPT2Config").make_hf("vocab_size", V)
    attn = gpt2.transformer.h[0].attn
    attn.register_buffer("bias", torch.ones(4, 4, dtype=torch.bool).tril())
    attn.register_buffer("masked_bias", torch.tensor(-1e4))
    assert "transformer.h.0.attn.bias" in gpt2.state_dict()
    model_module("gpt2").GPT2.from_hf(gpt2)
    llama = _family("LlamaConfig").make_hf("vocab_size", V)
    llama.model.rotary_emb.register_buffer("inv_freq", torch.ones(8), persistent=True)
    assert "model.rotary_emb.inv_freq" in llama.state_dict()
    model_module("llama").Llama.from_hf(llama)


@pytest.mark.parametrize("config", ["LlamaConfig", "BertConfig", "T5Config", "GPT2Config"])
def test_from_hf_keeps_the_dtype(config):
    """A bfloat16 HF model converts to a bfloat16 model (logits within twice transformers' own bfloat16 error of
    the float32 result); dtype= asks for another."""
    from tests.compare import assert_close

    fam = _family(config)
    hf = _perturbed(fam.make_hf("vocab_size", V))
    inputs, real = _inputs(fam, hf)
    with torch.no_grad():
        truth = hf(**inputs).logits
        hf_bf16 = hf.to(torch.bfloat16)
        ours = fam.ours_class().from_hf(hf_bf16)
        assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
        mine, theirs = ours.eval()(**inputs).logits, hf_bf16(**inputs).logits
    assert mine.dtype == torch.bfloat16
    if fam.kind != "seq2seq":
        mine, theirs, truth = mine[real], theirs[real], truth[real]
    assert_close(mine, truth, theirs, name=f"{config} bf16 logits")
    as_float = fam.ours_class().from_hf(hf_bf16, dtype=torch.float32)
    assert {p.dtype for p in as_float.parameters()} == {torch.float32}


def _dropout_cases():
    for fam in FAMILIES:
        for name, why in fam.not_math.items():
            if why == DROPOUT:
                yield pytest.param(fam, name, id=f"{fam.hf_model}-{name}")


def _carries(model, value: float) -> bool:
    """Whether `value` is in our config or in an attribute of one of our modules (a dropout probability)."""
    import dataclasses

    if value in dataclasses.asdict(model.config).values():
        return True
    return any(value in (v for v in vars(m).values() if isinstance(v, float)) for m in model.modules())


@pytest.mark.parametrize("fam,name", list(_dropout_cases()))
def test_dropout_fields_are_read(fam, name):
    """The dropout probabilities listed as not changing the (eval) logits are still carried into our model, which
    applies them in training."""
    ours = fam.ours_class().from_hf(fam.make_hf(name, 0.37))
    assert _carries(ours, 0.37), f"{name}=0.37 is not carried into our model"


CLASSIFIERS = [("BertConfig", "bert", "Bert"), ("ElectraConfig", "electra", "Electra"),
               ("RobertaConfig", "roberta", "Roberta"), ("AlbertConfig", "albert", "Albert"),
               ("DistilBertConfig", "distilbert", "DistilBert"), ("ErnieConfig", "ernie", "Ernie"),
               ("MobileBertConfig", "mobilebert", "MobileBert"), ("XLMConfig", "xlm", "XLM"),
               ("XLNetConfig", "xlnet", "XLNet")]


@pytest.mark.parametrize("config,module,prefix", CLASSIFIERS, ids=[c[2] for c in CLASSIFIERS])
@pytest.mark.parametrize("change", [dict(num_labels=1), dict(problem_type="multi_label_classification")],
                         ids=["regression", "multi_label"])
def test_sequence_classifiers_refuse_other_losses(config, module, prefix, change):
    """Our sequence classifiers' loss is cross-entropy: transformers' regression (num_labels=1) and multi-label
    losses are refused, naming the field."""
    name = f"{prefix}ForSequenceClassification"
    hf = getattr(transformers, name)(getattr(transformers, config)(**{**_family(config).base, **change}))
    with pytest.raises(NotImplementedError, match=next(iter(change))):
        getattr(model_module(module), name).from_hf(hf)
