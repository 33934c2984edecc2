"""Task heads, and the task models that put one head on a backbone: one `forward` per task, one backbone call.

    model = MaskedLM(config, BertModel(config, add_pooling_layer=False), MLMHead(...))  # = BertForMaskedLM
    out = model(input_ids, attention_mask=mask, unpad=True)              # logits [B, L, V]
    out = model(input_ids, attention_mask=mask, labels=labels)            # loss only: logits is None

Heads (modules on hidden states; shapes in the docstrings):
    MLMHead              transform (dense + act + LayerNorm, optional), then scores against the tied embeddings
    ClassificationHead   dropout, optional dense + activation, dropout, optional output projection
    SpanBoundaryHead     SpanBERT's span boundary objective
    SQuADHead            XLM / XLNet's beam-search span QA (start top-k, end top-k per start, answerability)

Task models (an `EncoderTask` each: a BERT-family backbone (encoder.Encoder) and its heads; a family file
declares its own, e.g. `AlbertForMaskedLM`, as one of these with its backbone and transformers' names):
    MaskedLM, PreTraining (MLM + NSP or SOP), NextSentencePrediction, SequenceClassification,
    TokenClassification, QuestionAnswering, ReplacedTokenDetection (ELECTRA's discriminator).
(XLM's and XLNet's SQuAD models, SpanBERT's MLM + SBO and ELECTRA's pre-trainer sit in their family files.)

Every task forward takes the backbone's inputs as the backbone does (input_ids, then attention_mask,
token_type_ids, position_ids positionally or by name; lengths, unpad and a variant's per-token inputs such as
task_type_ids or langs by name), and its labels by name.

**MLM with labels:** the head and the loss run on the labelled rows only (labels != -100), through the fused
`ptm_kernels.mlm_loss` (the [N, V] logits of the other rows are never computed, those of the labelled rows not
kept); such a call returns **`logits=None`** (`prediction_logits=None` for PreTraining), as the transformers
patches do (ptm_kernels.hf.bert). Call without labels for the logits. A batch without any labelled row gives a
loss of 0 with zero gradients (where torch's mean gives NaN).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ptm_kernels as pk
from ptm_kernels.nn import LayerNorm

from . import activations
from .convert import HFTwin, SingleLabelClassifier, prefixed
from .encoder import BiasAct, Encoder, EncoderInputs, Output

IGNORE_INDEX = -100


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding, BiasAct)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def linear_mapping(ours: str, hf: str) -> list:
    return [(f"{ours}.weight", f"{hf}.weight"), (f"{ours}.bias", f"{hf}.bias")]


# ------------------------------------------------------------------------------------------------ heads


class MLMHead(nn.Module):
    """[N, C] -> [N, V]: transform (dense C -> E + act, LayerNorm; absent for XLM), then scores against the
    decoder weight [V, E] (the tied input embeddings) + bias [V]. MobileBERT: `extra_columns` more decoder
    columns of its own (`dense` [extra, V], transformers' layout), E = embeddings + extra."""

    def __init__(self, hidden: int, vocab: int, act: Optional[str], eps: float = 1e-12,
                 out_dim: Optional[int] = None, extra_columns: int = 0):
        super().__init__()
        out_dim = out_dim or hidden
        self.transform = BiasAct(hidden, out_dim, act) if act is not None else None
        self.norm = LayerNorm(out_dim, eps=eps) if act is not None else None
        self.bias = nn.Parameter(torch.zeros(vocab))
        init_weights(self)
        self.dense = nn.Parameter(torch.randn(extra_columns, vocab) * 0.02) if extra_columns else None

    def features(self, h: Tensor) -> Tensor:
        return h if self.transform is None else self.norm(self.transform(h))

    def weight(self, embeddings: Tensor) -> Tensor:
        """The decoder [V, E]: the tied embeddings (and the extra columns)."""
        return embeddings if self.dense is None else torch.cat([embeddings, self.dense.t()], 1)

    def forward(self, h: Tensor, embeddings: Tensor) -> Tensor:
        return F.linear(self.features(h), self.weight(embeddings), self.bias)

    def loss(self, h: Tensor, labels: Tensor, embeddings: Tensor) -> Tensor:
        """The mean cross-entropy over the rows whose label is not -100, computing the head on those rows only
        (ptm_kernels.mlm_loss: chunked, the [N, V] logits never exist). h [..., C], labels [...]."""
        return pk.mlm_loss(h, labels, None if self.transform is None else self.features, self.weight(embeddings),
                           self.bias, ignore_index=IGNORE_INDEX)

    @staticmethod
    def mapping(dense: Optional[str], norm: Optional[str], bias: str, decoder_bias: Optional[str] = None) -> list:
        m = linear_mapping("transform", dense) + linear_mapping("norm", norm) if dense else []
        return m + [("bias", bias)] + ([("bias", decoder_bias)] if decoder_bias else [])


class ClassificationHead(nn.Module):
    """[..., C] -> [..., n_out]: dropout(p_in), then (optional) dense + activation (its bias fused), dropout(p_mid),
    then (optional) the output projection. The shapes of the BERT family's classifiers:
        BERT (on the pooled vector)  dropout, out                     RoBERTa  dropout, dense + tanh, dropout, out
        ELECTRA                      dropout, dense + GELU, dropout, out
        DistilBERT                   dense + ReLU, dropout, out       XLM      dropout, dense (+ tanh)
        ELECTRA's discriminator      dense + hidden_act, out (one logit)"""

    def __init__(self, hidden: int, n_out: Optional[int], *, dense: Optional[int] = None, act: str = "linear",
                 p_in: float = 0.0, p_mid: float = 0.0):
        super().__init__()
        activations.get(act)
        self.dense = BiasAct(hidden, dense, act) if dense else None
        self.out = nn.Linear(dense or hidden, n_out) if n_out else None
        self.act, self.p_in, self.p_mid = act, p_in, p_mid
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = F.dropout(x, self.p_in, self.training)
        x = self.dense(x) if self.dense is not None else activations.apply(x, self.act)
        x = F.dropout(x, self.p_mid, self.training)
        return self.out(x) if self.out is not None else x

    def mapping(self, name: str, dense: Optional[str], out: Optional[str]) -> list:
        """Rows for this head as our attribute `name`, given transformers' names of its dense and output layers."""
        m = linear_mapping(f"{name}.dense", dense) if self.dense is not None else []
        return m + (linear_mapping(f"{name}.out", out) if self.out is not None else [])


class SpanBoundaryHead(nn.Module):
    """SpanBERT's SBO: each token x_i of a masked span (s..e) from the two boundary tokens outside it and the
    position of i inside the span: y_i = LN(GeLU(W2 LN(GeLU(W1 [h_{s-1}; h_{e+1}; p_{i-s}])))), scored against
    the tied input embeddings."""

    def __init__(self, hidden: int, vocab: int, max_span: int, act: str, eps: float):
        super().__init__()
        self.position = nn.Embedding(max_span, hidden)
        self.fc1, self.norm1 = BiasAct(3 * hidden, hidden, act), LayerNorm(hidden, eps=eps)
        self.fc2, self.norm2 = BiasAct(hidden, hidden, act), LayerNorm(hidden, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab))
        self.max_span = max_span
        init_weights(self)

    @staticmethod
    def targets(spans: Tensor):
        """For spans [N, 3] of (b, start, end) (end exclusive), every span token: (span index, b, position)."""
        n = spans[:, 2] - spans[:, 1]
        span = torch.repeat_interleave(torch.arange(len(spans), device=spans.device), n)
        first = torch.cumsum(n, 0) - n
        pos = spans[span, 1] + torch.arange(int(n.sum()), device=spans.device) - first[span]
        return span, spans[span, 0], pos

    def forward(self, h: Tensor, spans: Tensor, word_embeddings: Tensor) -> Tensor:
        """h [B, L, C]; spans [N, 3] with 1 <= start < end < L. Logits [T, V], T = the spans' total length, in
        the order of `targets(spans)`."""
        span, b, pos = self.targets(spans)
        left = h[b, spans[span, 1] - 1]  # the boundary tokens just outside the span
        right = h[b, spans[span, 2]]
        p = self.position((pos - spans[span, 1]).clamp(max=self.max_span - 1))
        x = self.norm1(self.fc1(torch.cat([left, right, p], -1)))
        x = self.norm2(self.fc2(x))
        return F.linear(x, word_embeddings, self.bias)


def _masked_logits(x: Tensor, p_mask: Optional[Tensor]) -> Tensor:
    """transformers' p_mask rule: logits * (1 - p_mask) - big * p_mask (65500 in float16, else 1e30)."""
    if p_mask is None:
        return x
    return x * (1 - p_mask) - (65500 if p_mask.dtype == torch.float16 else 1e30) * p_mask


SQuADOutput = Output  # SQuADHead's output: the loss, or the beam's fields (see encoder.Output)


class SQuADHead(nn.Module):
    """Beam-search span QA with answerability (SQuAD 2.0), as transformers' XLM / XLNet SQuAD head.

    start logits [B, L] from one dense layer; end logits conditioned on a start: dense_0 [h_j; h_start] -> tanh
    -> LayerNorm -> dense_1; answer class (is the question impossible) from [start state; cls state].
    Training (start_positions and end_positions given): loss = (CE(start) + CE(end)) / 2 (+ BCE(answer class) / 2
    with cls_index and is_impossible). Inference: the start_n_top most probable starts, for each the end_n_top
    most probable ends, and the answer class from the start states averaged under the start probabilities.
    (transformers names the probabilities `*_log_probs`: they are softmax probabilities; kept as they are.)"""

    def __init__(self, hidden: int, eps: float, start_n_top: int, end_n_top: int):
        super().__init__()
        self.start = nn.Linear(hidden, 1)
        self.end_0, self.end_norm, self.end_1 = nn.Linear(2 * hidden, hidden), LayerNorm(hidden, eps=eps), \
            nn.Linear(hidden, 1)
        self.cls_0, self.cls_1 = nn.Linear(2 * hidden, hidden), nn.Linear(hidden, 1, bias=False)
        self.start_n_top, self.end_n_top = start_n_top, end_n_top
        init_weights(self)

    def end_logits(self, h: Tensor, start_states: Tensor, p_mask: Optional[Tensor]) -> Tensor:
        """h, start_states [..., L, C] -> [..., L]"""
        x = self.end_norm(torch.tanh(self.end_0(torch.cat([h, start_states], -1))))
        return _masked_logits(self.end_1(x).squeeze(-1), p_mask)

    def answer_class(self, h: Tensor, start_states: Tensor, cls_index: Optional[Tensor]) -> Tensor:
        """h [B, L, C], start_states [B, C] -> [B]; the cls token at cls_index, else the last token."""
        cls = h[:, -1] if cls_index is None else h[torch.arange(h.shape[0], device=h.device), cls_index]
        return self.cls_1(torch.tanh(self.cls_0(torch.cat([start_states, cls], -1)))).squeeze(-1)

    def forward(self, h: Tensor, start_positions=None, end_positions=None, cls_index=None, is_impossible=None,
                p_mask=None) -> SQuADOutput:
        B, L, C = h.shape
        start_logits = _masked_logits(self.start(h).squeeze(-1), p_mask)  # [B, L]
        flat = [None if t is None else t.reshape(B) for t in (start_positions, end_positions, cls_index,
                                                              is_impossible)]
        start_positions, end_positions, cls_index, is_impossible = flat
        rows = torch.arange(B, device=h.device)
        if start_positions is not None and end_positions is not None:
            start_states = h[rows, start_positions]  # [B, C]
            end_logits = self.end_logits(h, start_states[:, None].expand(B, L, C), p_mask)
            loss = (F.cross_entropy(start_logits, start_positions) + F.cross_entropy(end_logits, end_positions)) / 2
            if cls_index is not None and is_impossible is not None:
                cls_logits = self.answer_class(h, start_states, cls_index)
                loss = loss + 0.5 * F.binary_cross_entropy_with_logits(cls_logits, is_impossible.to(cls_logits.dtype))
            return SQuADOutput(loss=loss)
        start_probs = start_logits.softmax(-1)
        start_top, start_index = start_probs.topk(self.start_n_top, -1)  # [B, k]
        start_states = h.gather(1, start_index[..., None].expand(B, self.start_n_top, C))  # [B, k, C]
        start_states = start_states[:, None].expand(B, L, self.start_n_top, C)
        end_logits = self.end_logits(h[:, :, None].expand_as(start_states), start_states,
                                     None if p_mask is None else p_mask[..., None])  # [B, L, k]
        end_top, end_index = end_logits.softmax(1).topk(self.end_n_top, 1)  # [B, k_end, k]
        cls_logits = self.answer_class(h, torch.einsum("blh,bl->bh", h, start_probs), cls_index)
        return SQuADOutput(start_top_log_probs=start_top, start_top_index=start_index,
                           end_top_log_probs=end_top.reshape(B, -1), end_top_index=end_index.reshape(B, -1),
                           cls_logits=cls_logits)

    def mapping(self) -> list:
        """Our names (relative to this head) and transformers' (relative to its SQuAD head's parent)."""
        return (linear_mapping("start", "start_logits.dense") + linear_mapping("end_0", "end_logits.dense_0")
                + linear_mapping("end_norm", "end_logits.LayerNorm") + linear_mapping("end_1", "end_logits.dense_1")
                + linear_mapping("cls_0", "answer_class.dense_0") + [("cls_1.weight", "answer_class.dense_1.weight")])


# ------------------------------------------------------------------------------------------ task models


def cross_entropy(logits: Tensor, labels: Optional[Tensor]) -> Optional[Tensor]:
    """Mean cross-entropy over the rows whose label is not -100 (fused ptm_kernels op; float32 math)."""
    if labels is None:
        return None
    return pk.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)


class EncoderTask(HFTwin, nn.Module):
    """A task model: a BERT-family backbone (`self.backbone`, an encoder.Encoder) and its head(s).

    `hf_base` is the backbone's prefix in transformers' state dict ("bert", "roberta", ...)."""

    hf_base = "bert"

    def __init__(self, config, backbone: Encoder):
        super().__init__()
        self.config, self.backbone = config, backbone

    @property
    def word_embeddings(self) -> Tensor:
        return self.backbone.embeddings.word.weight

    def backbone_mapping(self) -> list:
        return prefixed(self.backbone.hf_mapping(), "backbone.", self.hf_base + ".")


class MaskedLM(EncoderTask):
    """forward(..., labels=None) -> Output(last_hidden_state, logits [B, L, V], loss). With labels: the loss from
    the labelled rows only and logits=None (module docstring)."""

    # transformers' names: the tied decoder weight, and (prefix, dense, norm, bias, second bias name) of the head
    hf_decoder = "cls.predictions.decoder.weight"
    hf_head = ("cls.predictions.", "transform.dense", "transform.LayerNorm", "bias", "decoder.bias")

    def __init__(self, config, backbone: Encoder, mlm: MLMHead):
        super().__init__(config, backbone)
        self.mlm = mlm

    def decoder(self) -> Tensor:
        return self.word_embeddings

    def predict(self, h: Tensor, inputs: EncoderInputs, labels: Optional[Tensor]):
        """(logits [B, L, V], None) without labels; (None, loss) with labels: the head on the labelled rows only."""
        if labels is None:
            return inputs.unpack(self.mlm(h, self.decoder())), None
        return None, self.mlm.loss(h, labeled_rows(labels, inputs), self.decoder())

    def forward(self, input_ids: Tensor, *args, labels: Optional[Tensor] = None, **kwargs) -> Output:
        h, inputs = self.backbone.encode(input_ids, *args, **kwargs)  # [B, L, C] or packed [1, T, C]
        logits, loss = self.predict(h, inputs, labels)
        return Output(last_hidden_state=inputs.unpack(h), logits=logits, loss=loss)

    def mlm_mapping(self) -> list:
        prefix, *names = self.hf_head
        return ([("backbone.embeddings.word.weight", self.hf_decoder)]
                + prefixed(MLMHead.mapping(*names), "mlm.", prefix))

    def hf_mapping(self) -> list:
        return self.backbone_mapping() + self.mlm_mapping()


def labeled_rows(labels: Tensor, inputs: EncoderInputs) -> Tensor:
    """labels [B, L] in the layout of the hidden states; with unpad=True a label on a padded position (which
    was not computed) is an error, not silently dropped."""
    if inputs.packing is None:
        return labels
    packed = inputs.pack(labels)
    if int((packed != IGNORE_INDEX).sum()) != int((labels != IGNORE_INDEX).sum()):
        raise ValueError("labels: a padded position (attention_mask 0) carries a label; with unpad=True padded "
                         "positions are not computed (set their labels to -100)")
    return packed


class PreTraining(MaskedLM):
    """MLM + a sentence-pair head on the pooled output: NSP (BERT) or SOP (ALBERT: dropout first).
    forward(..., labels=None, next_sentence_label=None) -> Output(last_hidden_state, prediction_logits,
    seq_relationship_logits, loss); with labels prediction_logits is None (the MLM part on its labelled rows)."""

    def __init__(self, config, backbone: Encoder, mlm: MLMHead, sentence: Optional[ClassificationHead] = None):
        super().__init__(config, backbone, mlm)
        self.sentence = sentence or ClassificationHead(config.hidden_size, 2)  # NSP: is-next / not-next

    hf_sentence = "cls.seq_relationship"  # transformers' name of the sentence-pair classifier

    def hf_mapping(self) -> list:
        return super().hf_mapping() + self.sentence.mapping("sentence", None, self.hf_sentence)

    def forward(self, input_ids: Tensor, *args, labels: Optional[Tensor] = None,
                next_sentence_label: Optional[Tensor] = None, sentence_order_label: Optional[Tensor] = None,
                **kwargs) -> Output:
        h, inputs = self.backbone.encode(input_ids, *args, **kwargs)
        padded = inputs.unpack(h)
        sentence = self.sentence(self.backbone.pool(padded))
        logits, loss = self.predict(h, inputs, labels)
        pair = next_sentence_label if next_sentence_label is not None else sentence_order_label
        if pair is not None:
            loss = cross_entropy(sentence, pair) + (0 if loss is None else loss)
        return Output(last_hidden_state=padded, prediction_logits=logits, seq_relationship_logits=sentence,
                      loss=loss)


class NextSentencePrediction(EncoderTask):
    """Is the second segment the first's continuation: a Linear(H, 2) on the pooled output."""

    def __init__(self, config, backbone: Encoder):
        super().__init__(config, backbone)
        self.sentence = ClassificationHead(config.hidden_size, 2)

    def forward(self, input_ids: Tensor, *args, labels: Optional[Tensor] = None, **kwargs) -> Output:
        h, inputs = self.backbone.encode(input_ids, *args, **kwargs)
        h = inputs.unpack(h)
        logits = self.sentence(self.backbone.pool(h))
        return Output(last_hidden_state=h, logits=logits, loss=cross_entropy(logits, labels))

    def hf_mapping(self) -> list:
        return self.backbone_mapping() + self.sentence.mapping("sentence", None, PreTraining.hf_sentence)


def head_dropout(config) -> float:
    """The BERT family's classifier dropout: classifier_dropout, else hidden_dropout_prob."""
    p = getattr(config, "classifier_dropout", None)
    return p if p is not None else config.hidden_dropout_prob


def first_token_classifier(config, act: str) -> ClassificationHead:
    """RoBERTa's / ELECTRA's sentence classifier: dropout, dense + act, dropout, out_proj."""
    p = head_dropout(config)
    return ClassificationHead(config.hidden_size, config.num_labels, dense=config.hidden_size, act=act, p_in=p,
                              p_mid=p)


class SequenceClassification(SingleLabelClassifier, EncoderTask):
    """The classifier on the pooled output (`pooled=True`: BERT, ALBERT, ERNIE, MobileBERT; by default
    dropout and a Linear, named `classifier` in transformers) or on the first token (RoBERTa, ELECTRA,
    DistilBERT, XLM). `hf_names`: transformers' names of its dense and output layers."""

    def __init__(self, config, backbone: Encoder, classifier: Optional[ClassificationHead] = None,
                 pooled: bool = True, hf_names=(None, "classifier")):
        super().__init__(config, backbone)
        if classifier is None:
            classifier = ClassificationHead(config.hidden_size, config.num_labels, p_in=head_dropout(config))
        self.classifier, self.pooled, self.hf_names = classifier, pooled, hf_names

    def forward(self, input_ids: Tensor, *args, labels: Optional[Tensor] = None, **kwargs) -> Output:
        h, inputs = self.backbone.encode(input_ids, *args, **kwargs)
        h = inputs.unpack(h)
        logits = self.classifier(self.backbone.pool(h) if self.pooled else h[:, 0])
        return Output(last_hidden_state=h, logits=logits, loss=cross_entropy(logits, labels))

    def hf_mapping(self) -> list:
        return self.backbone_mapping() + self.classifier.mapping("classifier", *self.hf_names)


class TokenClassification(EncoderTask):
    """A label per token: logits [B, L, num_labels]; by default dropout and a Linear (`classifier`)."""

    def __init__(self, config, backbone: Encoder, classifier: Optional[ClassificationHead] = None):
        super().__init__(config, backbone)
        self.classifier = classifier or ClassificationHead(config.hidden_size, config.num_labels,
                                                           p_in=head_dropout(config))

    def forward(self, input_ids: Tensor, *args, labels: Optional[Tensor] = None, **kwargs) -> Output:
        h, inputs = self.backbone.encode(input_ids, *args, **kwargs)
        logits = inputs.unpack(self.classifier(h))
        return Output(last_hidden_state=inputs.unpack(h), logits=logits, loss=cross_entropy(logits, labels))

    def hf_mapping(self) -> list:
        return self.backbone_mapping() + self.classifier.mapping("classifier", None, "classifier")


class ReplacedTokenDetection(TokenClassification):
    """ELECTRA's discriminator: one logit per token, > 0 meaning 'replaced'; labels 0/1, binary cross-entropy
    over the real tokens."""

    def forward(self, input_ids: Tensor, *args, labels: Optional[Tensor] = None, **kwargs) -> Output:
        h, inputs = self.backbone.encode(input_ids, *args, **kwargs)
        logits = self.classifier(h).squeeze(-1)  # [B, L] or packed [1, T]
        loss = None
        if labels is not None:  # over the real tokens: the packed rows, or the padded batch's real positions
            rows, labels = (logits, inputs.pack(labels)) if inputs.packing is not None or inputs.real is None else \
                (logits[inputs.real], labels[inputs.real])
            loss = F.binary_cross_entropy_with_logits(rows.reshape(-1), labels.reshape(-1).to(logits.dtype))
        return Output(last_hidden_state=inputs.unpack(h), logits=inputs.unpack(logits), loss=loss)

    def hf_mapping(self) -> list:
        return self.backbone_mapping() + self.classifier.mapping("classifier", "discriminator_predictions.dense",
                                                                 "discriminator_predictions.dense_prediction")


class QuestionAnswering(EncoderTask):
    """Span QA: a start and an end logit per token (after dropout: DistilBERT's qa_dropout; none elsewhere)."""

    def __init__(self, config, backbone: Encoder, dropout: float = 0.0):
        super().__init__(config, backbone)
        if getattr(config, "num_labels", 2) != 2:  # transformers builds num_labels outputs and splits them in two
            raise ValueError(f"config field num_labels={config.num_labels}: span QA has 2 outputs (start, end)")
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.dropout = dropout
        init_weights(self.qa_outputs)

    def forward(self, input_ids: Tensor, *args, start_positions: Optional[Tensor] = None,
                end_positions: Optional[Tensor] = None, **kwargs) -> Output:
        h, inputs = self.backbone.encode(input_ids, *args, **kwargs)
        start, end = inputs.unpack(self.qa_outputs(F.dropout(h, self.dropout, self.training))).unbind(-1)  # [B, L]
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = (cross_entropy(start, start_positions) + cross_entropy(end, end_positions)) / 2
        return Output(last_hidden_state=inputs.unpack(h), start_logits=start, end_logits=end, loss=loss)

    def hf_mapping(self) -> list:
        return self.backbone_mapping() + linear_mapping("qa_outputs", "qa_outputs")
