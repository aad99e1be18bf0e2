"""DoLa on the fused decoding engine: both arms read from one forward of the model.

Chuang et al., "DoLa: Decoding by Contrasting Layers Improves Factuality in Large Language
Models", ICLR 2024 (arXiv 2309.03883); code voidism/DoLa (its ``transformers-4.28.1`` fork,
``generation/utils.py`` ``dola_greedy_decode``, and ``modeling_llama.py``). transformers
carried it in core (PR #29619 until 4.52) as ``generate(dola_layers=...)``
(``generation/utils.py``: ``_dola_decoding``, ``_dola_select_contrast``,
``_relative_top_filter``). In 5.19, installed here, ``dola_layers`` only selects the Hub
repository ``transformers-community/dola`` (``GENERATION_MODES_MAPPING``,
``_get_deprecated_gen_repo`` in ``generation/utils.py``): generate() raises ValueError
without ``trust_remote_code=True`` and otherwise downloads and runs that repository's code
(its README: the core code of transformers before 4.53). Hence this implementation, which
follows the core one; "transformers" below means it.

Per step and per sample: the final layer's logits are arm *a*; every candidate ("premature")
layer's hidden state at the last position goes through the model's own output head ("early
exit"), and the candidate whose distribution diverges most from the final one is arm *b*
(:func:`select_premature`); :func:`dola_fuse` contrasts the two. :class:`LayerTap` keeps the
candidates' states of each forward, :class:`LayerStream` hands them back with the logits,
:class:`LayerContrast` is the :class:`~.arms.Arms` pair; :class:`RepeatPenalty` is the
repetition penalty that DoLa is meant to run with.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn

from ..validation import FrozenSettings
from .arms import Stream
from .fusions import _check


class DoLaSettings(FrozenSettings):
    """DoLa's settings; defaults from transformers' implementation and its documentation.

    ``layers``: the candidate premature layers, ``"low"`` or ``"high"``
    (:func:`candidate_layers`) or layer indices (0: the embedding output, ``N``: the final
    layer). The README of transformers-community/dola recommends ``"high"`` for short-answer
    tasks (TruthfulQA) and ``"low"`` for long-answer ones (GSM8K, StrategyQA, FACTOR,
    VicunaQA): the default is ``"low"``. ``relative_top`` (0.1) and ``min_tokens_to_keep`` (1)
    are ``_relative_top_filter``'s, fixed there; 0 turns the filter off, as
    ``relative_top > 0.0`` gates it in voidism/DoLa. ``repetition_penalty`` defaults to 1.2:
    transformers warns below it, recommending at least 1.2 for DoLa, and voidism/DoLa's README
    passes 1.2 for every open-ended task; 1.0 turns it off. ``final_norm`` puts the early-exit
    states through the final norm before the head: neither released code does (voidism/DoLa
    issue #9 asks for it), so it is off.
    """

    layers: Literal["low", "high"] | tuple[int, ...] = Field(
        "low", description='"low", "high" or premature layer indices (0: embeddings)'
    )
    relative_top: float = Field(
        0.1, ge=0.0, le=1.0, description="keep tokens with p_final >= this times its top; 0: all"
    )
    min_tokens_to_keep: int = Field(1, ge=1, description="the filter keeps at least this many")
    repetition_penalty: float = Field(1.2, gt=0.0, description="on the DoLa scores; 1.0: off")
    final_norm: bool = Field(False, description="final norm on early-exit states (not in DoLa)")

    @field_validator("layers")
    @classmethod
    def _indices(cls, layers):
        if isinstance(layers, tuple) and (not layers or min(layers) < 0):
            raise ValueError("layer indices must be given and >= 0 (0: the embedding output)")
        return layers

    def fuse(self, logits_a: Tensor, logits_b: Tensor, step: int) -> Tensor:
        return dola_fuse(logits_a, logits_b, step, self)


def candidate_layers(layers: str | Sequence[int], num_layers: int, tied: bool) -> list[int]:
    """The candidate premature layers of an ``num_layers``-layer model, as transformers'
    ``_dola_decoding`` picks them.

    ``tied``: the output head shares the input embeddings, where the embedding output's early
    exit is close to the identity: the candidates start at layer 2 (layer 1 for 2-layer models,
    0 for 1-layer ones); untied, at layer 0. ``"low"``: every second layer from there below
    ``N // 2`` (below 20 where ``N > 40``), or the start layer alone where it is ``N // 2``.
    ``"high"``: every second layer from ``N // 2`` (from ``N - 20`` where ``N > 40``) below
    ``N``. Indices: kept in order; ``N`` (the final layer) is dropped, as transformers drops it.
    Raises ValueError where no candidate is left (transformers fails at ``torch.stack`` there)
    or an index is no layer.
    """
    n = num_layers
    if n < 1:
        raise ValueError(f"a model with {n} decoder layers has no layer to contrast")
    if isinstance(layers, str):
        start = 0 if not tied else 2 if n > 2 else 1 if n == 2 else 0
        if layers == "low":
            chosen = (
                [start] if start == n // 2 else list(range(start, n // 2 if n <= 40 else 20, 2))
            )
        elif layers == "high":
            chosen = list(range(n // 2 if n <= 40 else n - 20, n, 2))
        else:
            raise ValueError(f'layers must be "low", "high" or layer indices, found {layers!r}')
        if not chosen:
            raise ValueError(
                f'layers="{layers}" leaves no candidate in a {n}-layer model with tied embeddings'
                " (it starts at layer 2); give the layers as indices"
            )
        return chosen
    outside = [i for i in layers if not 0 <= i <= n]
    if outside:
        raise ValueError(f"layers {outside} are no layers of the model: 0 (embeddings) to {n}")
    chosen = [i for i in layers if i < n]
    if not chosen:
        raise ValueError(
            f"layer {n} is the final layer: contrasted with itself every kept token scores 0 "
            "(the released code's naive decoding from the final layer is method 'none')"
        )
    return chosen


def layer_divergence(final: Tensor, candidates: Tensor) -> Tensor:
    """(K, B): how far each of K candidates' next-token distribution is from the final one's.

    ``final`` (B, V), ``candidates`` (K, B, V), logits. As both released codes compute it
    (``F.kl_div(log q, m)`` is KL(m || q)): ``(KL(m || p_final) + KL(m || p_k)) / 2`` with
    ``m = (p_final + p_k) / 2``, averaged over the vocabulary instead of summed (the same
    argmax). The paper's JSD puts ``m`` second in both terms; the code is followed.
    """
    log_final = final.float().log_softmax(-1)[None].expand(candidates.shape)
    log_cand = candidates.float().log_softmax(-1)
    mean = 0.5 * (log_final.exp() + log_cand.exp())
    kl_final = F.kl_div(log_final, mean, reduction="none").mean(-1)
    kl_cand = F.kl_div(log_cand, mean, reduction="none").mean(-1)
    return 0.5 * (kl_final + kl_cand)


def select_premature(final: Tensor, candidates: Tensor) -> Tensor:
    """(B,) index of each sample's premature layer among the K candidates: the most divergent
    (:func:`layer_divergence`; the first of equals). Per sample: the released codes average the
    divergence over the batch and pick one layer for all (they ran batch size 1)."""
    return layer_divergence(final, candidates).argmax(0)


def relative_top_keep(log_probs: Tensor, relative_top: float, min_tokens_to_keep: int) -> Tensor:
    """``_relative_top_filter``'s kept tokens: ``log p >= max log p + log(relative_top)``, or the
    ``min_tokens_to_keep`` most likely where fewer pass (``relative_top`` 0: every token)."""
    top = log_probs.max(-1, keepdim=True).values
    cutoff = top + math.log(relative_top) if relative_top > 0 else torch.full_like(top, -math.inf)
    k = min(min_tokens_to_keep, log_probs.shape[-1])
    kth = log_probs.topk(k, dim=-1).values[..., -1:]
    return log_probs >= torch.minimum(kth, cutoff)


def dola_fuse(logits_a: Tensor, logits_b: Tensor, step: int, settings: DoLaSettings) -> Tensor:
    """``log_softmax(final) - log_softmax(premature)`` on the tokens :func:`relative_top_keep`
    keeps under the final layer, ``-inf`` elsewhere (the paper's Eq. 4 with its adaptive
    plausibility constraint; ``_dola_select_contrast`` after the selection).

    ``logits_a``: the final layer's logits, ``logits_b``: the premature layer's (both (B, V)).
    ``step`` is unused. Deviations: transformers writes ``-1e-3`` into the filtered premature
    scores before subtracting; the result there is ``-inf`` as here. Float32 throughout (the
    released codes contrast the premature layer's fp16 logits).
    """
    _check(logits_a, logits_b, step)
    log_final = logits_a.float().log_softmax(-1)
    log_premature = logits_b.float().log_softmax(-1)
    keep = relative_top_keep(log_final, settings.relative_top, settings.min_tokens_to_keep)
    return (log_final - log_premature).masked_fill(~keep, -math.inf)


def penalize_repeats(scores: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """The CTRL repetition penalty (Keskar et al. 2019) as transformers'
    ``RepetitionPenaltyLogitsProcessor`` applies it: on the tokens in ``seen`` (B, V), negative
    scores multiplied by ``penalty``, the others divided by it."""
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


class RepeatPenalty:
    """:func:`penalize_repeats` as a logits processor of :func:`~.engine.decode`, over each
    row's own tokens: its prompt's and those generated so far.

    transformers penalises every id in ``input_ids``, padding included, so a padded sample
    would not decode as it does alone; here the prompt's padding (``attention_mask`` 0) and ids
    outside the vocabulary (the original llava package's image placeholder) are left out. Built
    per generate() call: it counts the steps it has seen.
    """

    def __init__(self, penalty: float, prompt_ids: Tensor, attention_mask: Tensor | None = None):
        self.penalty = penalty
        real = torch.ones_like(prompt_ids, dtype=torch.bool)
        if attention_mask is not None:
            real = attention_mask.bool()
        self.prompt = prompt_ids.masked_fill(~real, -1)
        self.steps = 0

    def __call__(self, sequences: Tensor, scores: Tensor) -> Tensor:
        new = sequences[:, sequences.shape[1] - self.steps :]
        self.steps += 1
        tokens = torch.cat([self.prompt.to(new), new], 1)
        vocab = scores.shape[-1]
        valid = (tokens >= 0) & (tokens < vocab)
        seen = torch.zeros(scores.shape[0], vocab + 1, dtype=torch.bool, device=scores.device)
        seen.scatter_(1, torch.where(valid, tokens, vocab), True)
        return penalize_repeats(scores, seen[:, :vocab], self.penalty)


class LayerTap:
    """Hooks that keep, during each forward, the last position's hidden state at ``layers``:
    layer 0 is the input of the first decoder layer (the embedding output, images spliced in),
    layer ``i`` the output of decoder layer ``i - 1``, before the final norm. These are
    transformers' ``hidden_states[i]`` (its output-capturing hooks read the same tensors), kept
    at one position instead of all of them, and without the hooks transformers would leave on
    the model after a forward with ``output_hidden_states=True``. A context manager: the hooks
    live inside ``with`` only.
    """

    def __init__(self, decoder_layers: nn.ModuleList, layers: Sequence[int]):
        self.decoder_layers, self.layers = decoder_layers, list(layers)
        self.states: dict[int, Tensor] = {}
        self.hooks: list = []

    def __enter__(self) -> LayerTap:
        for i in self.layers:
            if i == 0:
                hook = self.decoder_layers[0].register_forward_pre_hook(
                    self._embedding, with_kwargs=True
                )
            else:
                hook = self.decoder_layers[i - 1].register_forward_hook(self._output(i))
            self.hooks.append(hook)
        return self

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        self.states.clear()

    def _embedding(self, module, args, kwargs) -> None:
        states = args[0] if args else kwargs["hidden_states"]
        self.states[0] = states[:, -1]

    def _output(self, layer: int):
        def keep(module, args, output) -> None:
            states = output[0] if isinstance(output, tuple) else output
            self.states[layer] = states[:, -1]

        return keep

    def take(self) -> Tensor:
        """(K, rows, hidden): the states of the last forward, in the order of ``layers``."""
        missing = [i for i in self.layers if i not in self.states]
        if missing:
            raise RuntimeError(f"the forward ran no decoder layer giving layers {missing}")
        out = torch.stack([self.states[i] for i in self.layers])
        self.states.clear()
        return out


class LayerStream(Stream):
    """A :class:`~.arms.Stream` that also hands back what ``tap`` kept of each forward: each
    step, (final logits (rows, V), early states (K, rows, hidden))."""

    def __init__(self, model: nn.Module, inputs: dict[str, Any], tap: LayerTap, use_cache=True):
        super().__init__(model, inputs, use_cache=use_cache)
        self.tap = tap

    def read(self, out) -> tuple[Tensor, Tensor]:
        return super().read(out), self.tap.take()


class LayerContrast:
    """DoLa's two arms from one forward per token: arm *a* the final layer's logits, arm *b*
    the premature layer's, chosen per sample and step by :func:`select_premature` among the
    candidates' early exits ``head(state)`` (the model's output head, after its final norm
    where asked).

    ``chosen`` collects, per step, the (B,) premature layer of each sample (the released
    code's ``premature_layer_dist``, per sample).
    """

    def __init__(self, stream: LayerStream, head: Callable[[Tensor], Tensor]):
        self.stream, self.head = stream, head
        self.prompt_ids = stream.prompt_ids
        self.chosen: list[Tensor] = []

    def prefill(self) -> tuple[Tensor, Tensor]:
        return self._arms(*self.stream.prefill())

    def feed(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        return self._arms(*self.stream.feed(tokens))

    def _arms(self, final: Tensor, states: Tensor) -> tuple[Tensor, Tensor]:
        candidates = self.head(states).float()  # (K, B, V)
        pick = select_premature(final, candidates)
        self.chosen.append(torch.tensor(self.stream.tap.layers, device=pick.device)[pick])
        return final, candidates[pick, torch.arange(len(pick), device=pick.device)]
