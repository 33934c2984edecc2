"""One `generate` for decoder-only (DecoderLM) and encoder-decoder (EncoderDecoderLM) models alike.

    tokens = generate(model, input_ids, max_new_tokens, attention_mask, num_beams=4, length_penalty=2.0)
    tokens = model.generate(input_ids, 20, do_sample=True, top_p=0.9, generator=torch.Generator().manual_seed(0))

Search: greedy, sampling (temperature, top_k, top_p, min_p; reproducible with a torch.Generator) and beam
search (num_beams, length_penalty, early_stopping, num_return_sequences). Logit processors: repetition_penalty,
no_repeat_ngram_size, min_new_tokens, forced_bos_token_id, forced_eos_token_id; eos_token_id may be a list;
stopping_criteria are callables (tokens [rows, t], scores [rows, V]) -> bool [rows]. Every rule is stated the
way transformers' `generate` (generation/utils.py, logits_process.py) applies it, in the same order, so greedy
and beam search give its tokens.

Decoder-only models return [rows, P + n] (prompts left padded: right padding is moved left first);
encoder-decoders return the decoder tokens [rows, 1 + n] from the decoder start token, as transformers does.

How a step runs (the `_Runner`s): the prompt runs once and fills a preallocated KV cache, computing the LM head
on its last position only (an encoder-decoder encodes the source once instead). Then every token runs through
the model's `decode_step` (DecoderLM's, EncoderDecoderLM's): static shapes, the cache written at a tensor index,
the masks built from tensors, the per-step inputs updated in place, so `compile=True` hands it to torch.compile
as one graph (fullgraph) that every step reuses.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

EosIds = Union[None, int, Sequence[int]]
FROM_MODEL = "model"  # a token id taken from the model's config


@dataclass
class GenerationConfig:
    """What `generate` does; field names and meanings are transformers' GenerationConfig's."""

    max_new_tokens: int = 20
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_p: Optional[float] = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False  # True, False or "never", as transformers
    num_return_sequences: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    eos_token_id: Union[EosIds, str] = FROM_MODEL  # None: no end token
    pad_token_id: Union[None, int, str] = FROM_MODEL
    decoder_start_token_id: Union[None, int, str] = FROM_MODEL
    forced_bos_token_id: Optional[int] = None
    forced_eos_token_id: EosIds = None
    stopping_criteria: Sequence[Callable[[Tensor, Tensor], Tensor]] = ()
    use_cache: bool = True
    compile: Union[bool, str] = False  # torch.compile the decode step; a str: its mode
    # ("reduce-overhead": CUDA graphs on a GPU)

    def __post_init__(self):
        if self.max_new_tokens < 0 or self.min_new_tokens < 0:
            raise ValueError(f"max_new_tokens and min_new_tokens must be >= 0, got {self.max_new_tokens}, "
                             f"{self.min_new_tokens}")
        if self.num_beams < 1 or not 1 <= self.num_return_sequences:
            raise ValueError(f"num_beams and num_return_sequences must be >= 1, got {self.num_beams}, "
                             f"{self.num_return_sequences}")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams "
                             f"({self.num_beams})")
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            raise ValueError("greedy search returns one sequence per input: num_return_sequences must be 1")
        if self.num_beams > 1 and self.do_sample:
            raise NotImplementedError("beam sampling (do_sample=True with num_beams > 1)")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if self.temperature <= 0 and self.do_sample:
            raise ValueError(f"temperature must be > 0 to sample, got {self.temperature}")
        if self.top_p is not None and not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in [0, 1], got {self.top_p}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must lie in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def _ids(x: EosIds) -> List[int]:
    return [] if x is None else [int(x)] if isinstance(x, int) else [int(i) for i in x]


def _from_model(model, value, name: str, default=None):
    return getattr(model.config, name, default) if value == FROM_MODEL else value


# ------------------------------------------------------------------------------------------ logit processors


class LogitsProcessor:
    """transformers' processors that the config asks for, in transformers' order; then, sampling, its warpers.

    `prompt_len`: tokens before the first generated one (P, or 1 for the decoder start token); `max_length`:
    prompt_len + max_new_tokens; `pad_lengths` [rows]: left padding of each row (the repetition penalty skips it).
    """

    def __init__(self, cfg: GenerationConfig, eos: List[int], prompt_len: int, max_length: int,
                 pad_lengths: Optional[Tensor]):
        self.cfg, self.eos, self.prompt_len, self.max_length = cfg, eos, prompt_len, max_length
        self.pad_lengths = pad_lengths
        self.forced_eos = _ids(cfg.forced_eos_token_id)

    def __call__(self, tokens: Tensor, scores: Tensor) -> Tensor:
        c, t = self.cfg, tokens.shape[1]
        if c.repetition_penalty != 1.0:
            scores = repetition_penalty(tokens, scores, c.repetition_penalty, self.pad_lengths)
        if c.no_repeat_ngram_size > 0:
            scores = no_repeat_ngram(tokens, scores, c.no_repeat_ngram_size)
        if self.eos and t - self.prompt_len < c.min_new_tokens:
            scores = scores.index_fill(-1, torch.tensor(self.eos, device=scores.device), float("-inf"))
        if c.forced_bos_token_id is not None and t == 1:
            scores = _force(scores, [c.forced_bos_token_id])
        if self.forced_eos and t == self.max_length - 1:
            scores = _force(scores, self.forced_eos)
        return scores

    def warp(self, scores: Tensor) -> Tensor:
        """Sampling's warpers on processed scores: temperature, top-k, top-p, min-p (transformers' order)."""
        c = self.cfg
        return warp(scores, c.temperature, c.top_k, c.top_p, c.min_p)


def _force(scores: Tensor, ids: List[int]) -> Tensor:
    out = torch.full_like(scores, float("-inf"))
    out[:, ids] = 0.0
    return out


def repetition_penalty(tokens: Tensor, scores: Tensor, penalty: float, pad_lengths: Optional[Tensor]) -> Tensor:
    """Divide (positive) or multiply (negative) the scores of tokens already in the row by `penalty`; a row's
    left padding (pad_lengths [rows]) does not count."""
    V = scores.shape[-1]
    if pad_lengths is not None:
        cols = torch.arange(tokens.shape[1], device=tokens.device)
        tokens = tokens.masked_fill(cols < pad_lengths[:, None], V)  # to the spare column V
    tokens = tokens.clamp(max=V)
    padded = F.pad(scores, (0, 1))
    seen = padded.gather(1, tokens)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(1, tokens, seen)[:, :V]


def no_repeat_ngram(tokens: Tensor, scores: Tensor, n: int) -> Tensor:
    """Ban each token that would complete an n-gram already in the row: every window whose first n - 1 tokens
    equal the row's last n - 1 bans its last token."""
    t = tokens.shape[1]
    if t < n:
        return scores
    V = scores.shape[-1]
    windows = tokens.unfold(1, n, 1)  # [rows, t - n + 1, n]
    matches = (windows[..., :-1] == tokens[:, t + 1 - n:].unsqueeze(1)).all(-1)
    banned = scores.new_zeros((scores.shape[0], V + 1), dtype=torch.bool)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=V), V), True)
    return scores.masked_fill(banned[:, :V], float("-inf"))


def warp(scores: Tensor, temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
         min_p: Optional[float] = None) -> Tensor:
    """temperature, then top-k, top-p (the smallest set whose mass reaches top_p), min-p (probability at least
    min_p times the top one's); each keeps at least one token. As transformers' warpers."""
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        kth = scores.topk(min(max(top_k, 1), scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1)  # ascending
        drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1:] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    if min_p is not None:
        probs = scores.softmax(-1)
        drop = probs < min_p * probs.amax(-1, keepdim=True)
        drop.scatter_(-1, probs.argmax(-1, keepdim=True), False)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def sample_next(logits: Tensor, do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
                min_p: Optional[float] = None) -> Tensor:
    """The next token of each row from logits [B, V]: argmax, or a draw after the warpers."""
    if not do_sample:
        return logits.argmax(-1)
    probs = warp(logits.float(), temperature, top_k, top_p, min_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ------------------------------------------------------------------------------------------------- runners


def left_pad(input_ids: Tensor, attention_mask: Tensor):
    """Move each row's tokens (attention_mask 1) to the right end, in order: the batch becomes left padded
    (an already left-padded batch stays as it is, its padding ids included, as transformers keeps them)."""
    order = attention_mask.int().sort(dim=1, stable=True).indices  # padding first, then the tokens in order
    return input_ids.gather(1, order), attention_mask.gather(1, order)


def _compiled_step(model, mode):
    """model.decode_step through torch.compile (one graph, static shapes), kept on the model per mode."""
    steps = model.__dict__.setdefault("_compiled_decode_steps", {})
    mode = None if mode is True else mode
    if mode not in steps:
        steps[mode] = torch.compile(model.decode_step, fullgraph=True, dynamic=False, mode=mode)
    return steps[mode]


class _DecoderOnly:
    """Next-token logits of a DecoderLM: prefill once, then static decode steps (or recompute, no cache)."""

    def __init__(self, model, prompt: Tensor, prompt_mask: Tensor, total: int, cfg: GenerationConfig):
        rows, P = prompt.shape
        dev = prompt.device
        self.model, self.cfg, self.P = model, cfg, P
        self.mask = torch.ones(rows, total, dtype=torch.bool, device=dev)
        self.mask[:, :P] = prompt_mask
        self.positions = (self.mask.long().cumsum(-1) - 1).clamp(min=0)  # each row counts its own tokens
        self.cache = model.new_cache(rows, total) if cfg.use_cache else None
        self.step = _compiled_step(model, cfg.compile) if cfg.compile else model.decode_step
        self.eager = not cfg.compile  # an eager step attends over the filled columns only (cache.filled)
        # no padded row: the step needs no key mask (the compiled one keeps its input, one graph either way)
        self.key_mask = self.mask if cfg.compile or not bool(prompt_mask.all()) else None
        # the decode step's inputs, updated in place (the compiled graph is reused as it is)
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=dev)
        self.position = torch.zeros(rows, 1, dtype=torch.long, device=dev)
        self.index = torch.zeros(1, dtype=torch.long, device=dev)

    def __call__(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        if self.cache is None:
            return self.model(tokens, attention_mask=self.mask[:, :t], position_ids=self.positions[:, :t],
                              num_logits_to_keep=1).logits[:, -1]
        if t == self.P:  # prefill: the prompt fills the cache
            return self.model(tokens, attention_mask=self.mask[:, :t], position_ids=self.positions[:, :t],
                              cache=self.cache, num_logits_to_keep=1).logits[:, -1]
        self.token.copy_(tokens[:, -1:])
        self.position.copy_(self.positions[:, t - 1:t])
        self.index.fill_(t - 1)
        self.cache.index = self.index
        if self.eager:
            self.cache.filled = t
        return self.step(self.token, self.position, self.cache, self.key_mask)

    def reorder(self, rows: Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(rows)


class _EncoderDecoder:
    """Next-token logits of an EncoderDecoderLM's decoder, the source encoded once (and its cross-attention
    keys/values projected once); then static decode steps (EncoderDecoderLM.decode_step) from the start
    token on, or recompute without a cache."""

    def __init__(self, model, input_ids: Tensor, attention_mask: Optional[Tensor], copies: int, total: int,
                 cfg: GenerationConfig):
        self.model = model
        enc = model.encode(input_ids, attention_mask)
        if copies > 1:  # each source once per beam / returned sequence, copies of a source adjacent
            enc = enc.repeat_interleave(copies, 0)
            attention_mask = attention_mask.repeat_interleave(copies, 0) if attention_mask is not None else None
        self.enc, self.attention_mask = enc, attention_mask
        self.cache = model.new_cache(enc, attention_mask, total) if cfg.use_cache else None
        self.step = _compiled_step(model, cfg.compile) if cfg.compile else model.decode_step
        # the decode step's inputs, updated in place (the compiled graph is reused as it is)
        self.token = torch.zeros(enc.shape[0], 1, dtype=torch.long, device=enc.device)
        self.index = torch.zeros(1, dtype=torch.long, device=enc.device)

    def __call__(self, tokens: Tensor) -> Tensor:
        if self.cache is None:
            h = self.model.decode(tokens, self.enc, self.attention_mask)
            return self.model.project(h[:, -1:])[:, -1]
        self.token.copy_(tokens[:, -1:])
        self.index.fill_(tokens.shape[1] - 1)
        self.cache.self_attn.index = self.index
        return self.step(self.token, self.cache)

    def reorder(self, rows: Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(rows)


# ------------------------------------------------------------------------------------------------ generate


@torch.no_grad()
def generate(model, input_ids: Tensor, max_new_tokens: Optional[int] = None,
             attention_mask: Optional[Tensor] = None, *, generator: Optional[torch.Generator] = None,
             config: Optional[GenerationConfig] = None, **kwargs) -> Tensor:
    """Continue each input by up to max_new_tokens tokens (see the module docstring); kwargs are
    GenerationConfig's fields. Rows that finished (eos or a stopping criterion) continue with the pad token;
    generation stops early once every row has. `generator` draws the samples (reproducible sampling)."""
    names = {f.name for f in fields(GenerationConfig)}
    unknown = set(kwargs) - names
    if unknown:
        raise TypeError(f"generate got unknown arguments {sorted(unknown)} (GenerationConfig fields: {sorted(names)})")
    cfg = config or GenerationConfig()
    if kwargs or max_new_tokens is not None:
        cfg = GenerationConfig(**{**{f: getattr(cfg, f) for f in names}, **kwargs,
                                  **({"max_new_tokens": max_new_tokens} if max_new_tokens is not None else {})})
    eos = _ids(_from_model(model, cfg.eos_token_id, "eos_token_id"))
    pad = _from_model(model, cfg.pad_token_id, "pad_token_id")
    if pad is None:
        pad = eos[0] if eos else 0
    encoder_decoder = hasattr(model, "encode")
    B = input_ids.shape[0]
    copies = cfg.num_beams if cfg.num_beams > 1 else cfg.num_return_sequences
    if encoder_decoder:
        start = _from_model(model, cfg.decoder_start_token_id, "decoder_start_token_id")
        tokens = torch.full((B * copies, 1), start, dtype=torch.long, device=input_ids.device)
        runner = _EncoderDecoder(model, input_ids, attention_mask, copies, 1 + cfg.max_new_tokens, cfg)
        pad_lengths = None
    else:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        tokens, prompt_mask = left_pad(input_ids, attention_mask.bool())
        if copies > 1:
            tokens, prompt_mask = tokens.repeat_interleave(copies, 0), prompt_mask.repeat_interleave(copies, 0)
        runner = _DecoderOnly(model, tokens, prompt_mask, tokens.shape[1] + cfg.max_new_tokens, cfg)
        pad_lengths = (~prompt_mask).sum(1)
    prompt_len = tokens.shape[1]
    processor = LogitsProcessor(cfg, eos, prompt_len, prompt_len + cfg.max_new_tokens, pad_lengths)
    if cfg.num_beams > 1:
        return beam_search(runner, processor, tokens, cfg, eos, pad)
    return _greedy_or_sample(runner, processor, tokens, cfg, eos, pad, generator)


def _stops(tokens: Tensor, scores: Tensor, eos: Optional[Tensor], criteria) -> Tensor:
    """Rows that end after their last token: it is an eos, or a stopping criterion says so."""
    done = torch.isin(tokens[:, -1], eos) if eos is not None else tokens.new_zeros(tokens.shape[0], dtype=torch.bool)
    for criterion in criteria:
        done = done | criterion(tokens, scores)
    return done


def _greedy_or_sample(runner, processor: LogitsProcessor, prompt: Tensor, cfg: GenerationConfig, eos: List[int],
                      pad: int, generator: Optional[torch.Generator]) -> Tensor:
    rows, P = prompt.shape
    tokens = torch.full((rows, P + cfg.max_new_tokens), pad, dtype=torch.long, device=prompt.device)
    tokens[:, :P] = prompt
    eos_t = torch.tensor(eos, device=prompt.device) if eos else None
    may_stop = eos_t is not None or bool(cfg.stopping_criteria)
    # as transformers: rows that stopped continue with the pad token only when an eos is set
    unfinished = torch.ones(rows, dtype=torch.bool, device=prompt.device)
    for t in range(P, P + cfg.max_new_tokens):
        scores = processor(tokens[:, :t], runner(tokens[:, :t]).float())
        if cfg.do_sample:
            probs = processor.warp(scores).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            nxt = scores.argmax(-1)
        if eos_t is not None:
            nxt = torch.where(unfinished, nxt, pad)
        tokens[:, t] = nxt
        if may_stop:
            unfinished &= ~_stops(tokens[:, :t + 1], scores, eos_t, cfg.stopping_criteria)
            if not bool(unfinished.any()):
                return tokens[:, :t + 1]
    return tokens


def beam_search(runner, processor: LogitsProcessor, prompt: Tensor, cfg: GenerationConfig, eos: List[int],
                pad: int) -> Tensor:
    """transformers' (vectorized) beam search, `_beam_search` in generation/utils.py, restated.

    Per step: the top (1 + #eos, at least 2) * K continuations of all K beams of an input; the best K that did
    not just stop keep running; those among the top K that stopped (eos, a stopping criterion, or the length
    limit) enter the K finished hypotheses if their score sum(log p) / generated_length ** length_penalty is
    better. Stops when no running beam can beat the worst finished one (the heuristic `early_stopping`
    selects), when every continuation stopped, or, with early_stopping=True, when every input has K finished
    hypotheses. Returns the best num_return_sequences hypotheses per input [B * n, prompt + generated].
    """
    NEG = -1.0e9
    K, dev = cfg.num_beams, prompt.device
    B, P = prompt.shape[0] // K, prompt.shape[1]
    max_length = P + cfg.max_new_tokens
    keep = max(2, 1 + len(eos)) * K
    top_k_mask = torch.arange(keep, device=dev) < K
    batch_offset = torch.arange(B, device=dev).view(B, 1) * K
    eos_t = torch.tensor(eos, device=dev) if eos else None

    def gather(t: Tensor, idx: Tensor) -> Tensor:  # t [B, n, ...], idx [B, m] -> [B, m, ...]
        return t.gather(1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(*idx.shape, *t.shape[2:]))

    fill = (pad or eos[0]) if eos else pad  # what transformers fills finished hypotheses with (pad 0 -> eos)
    running = torch.full((B, K, max_length), fill, dtype=torch.long, device=dev)
    running[:, :, :P] = prompt.view(B, K, P)
    sequences = running.clone()
    running_scores = torch.zeros(B, K, device=dev)
    running_scores[:, 1:] = NEG
    scores = torch.full((B, K), NEG, device=dev)
    finished = torch.zeros(B, K, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    running_origin = torch.full((B, K, cfg.max_new_tokens), -1, dtype=torch.long, device=dev)
    origin = running_origin.clone()  # per generated position, the beam row it came from (-1: not generated)

    cur = P
    while cur < max_length:
        flat = running[:, :, :cur].reshape(B * K, cur)
        log_probs = processor(flat, F.log_softmax(runner(flat).float(), -1))
        V = log_probs.shape[-1]
        log_probs = (log_probs.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)
        top_lp, top_idx = log_probs.topk(keep, dim=1)
        beam, token = top_idx // V, top_idx % V
        top_seqs = gather(running, beam)
        top_seqs[:, :, cur] = token
        top_origin = gather(running_origin, beam)
        top_origin[:, :, cur - P] = beam + batch_offset
        done = torch.full_like(token, cur + 1 >= max_length, dtype=torch.bool)
        if eos_t is not None or cfg.stopping_criteria:
            done = done | _stops(top_seqs[:, :, :cur + 1].reshape(B * keep, cur + 1), None, eos_t,
                                 cfg.stopping_criteria).view(B, keep)

        # the best K continuations that did not stop keep running
        live_lp = top_lp + done.float() * NEG
        nxt = live_lp.topk(K, dim=1).indices
        running, running_scores, running_origin = gather(top_seqs, nxt), gather(live_lp, nxt), gather(top_origin, nxt)

        # stopped continuations among the top K enter the finished hypotheses if they score better
        just_finished = done & top_k_mask
        fin = top_lp / (cur + 1 - P) ** cfg.length_penalty
        fin = fin + (finished.all(-1, keepdim=True) & (cfg.early_stopping is True)).float() * NEG
        fin = fin + (~improvable).float() * NEG
        fin = fin + (~just_finished).float() * NEG
        merged = torch.cat([scores, fin], 1).topk(K, dim=1).indices
        sequences = gather(torch.cat([sequences, top_seqs], 1), merged)
        scores = gather(torch.cat([scores, fin], 1), merged)
        origin = gather(torch.cat([origin, top_origin], 1), merged)
        finished = gather(torch.cat([finished, just_finished], 1), merged)

        runner.reorder(running_origin[:, :, cur - P].reshape(-1))
        cur += 1

        # can a running beam still beat the worst finished hypothesis?
        best_len = (max_length - P) if cfg.early_stopping == "never" and cfg.length_penalty > 0.0 else (cur - P)
        best_running = running_scores[:, :1] / best_len ** cfg.length_penalty
        worst_finished = torch.where(finished, scores.min(1, keepdim=True).values, torch.full_like(scores, NEG))
        improvable = improvable & (best_running > worst_finished).any(-1, keepdim=True)
        open_beam = not (bool(finished.all()) and cfg.early_stopping is True)
        if not (bool(improvable.any()) and open_beam and not bool(done.all())):
            break

    n = cfg.num_return_sequences
    best, origin = sequences[:, :n].reshape(B * n, -1), origin[:, :n].reshape(B * n, -1)
    return best[:, :P + int((origin >= 0).sum(1).max())]
