"""The arms of a two-arm method: rows the model decodes, each step's last-position logits.

A :class:`Stream` is one batch of rows through the model with its own KV cache: a prompt (token
ids, or embeddings where the model splices images before its forward, as the original llava
package does), then one token per row per step. Its bookkeeping is generate()'s own:
``prepare_inputs_for_generation`` slices the inputs and drops the pixels after the prefill, and
the position ids and attention mask are built and extended by the same two GenerationMixin
helpers generate() calls (in transformers 5.19, ``prepare_inputs_for_generation`` no longer
derives position ids, and cache positions are gone).

:class:`Arms` pairs two arms. :class:`SharedBatch` runs both in one stream of 2B rows (arm *a*
rows ``[:B]``, arm *b* rows ``[B:]``): the counterfactual is a transform that acts on rows
``[B:]`` (paper mode's layer-L shift) or on their inputs (other pixels). :class:`SeparateArms`
runs two streams, for an arm with its own prompt (no image: other input ids, its own cache).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn


class Stream:
    """Rows of one batch decoded token by token, with generate()'s model-input bookkeeping.

    ``inputs`` are the forward's keyword arguments for the prompt: ``input_ids`` (or
    ``inputs_embeds``), ``attention_mask`` and the model's own (``pixel_values``, ...).
    ``use_cache=False`` re-runs the whole sequence, pixels included, every step.
    """

    def __init__(self, model: nn.Module, inputs: dict[str, Any], use_cache: bool = True):
        self.model = model
        self.use_cache = use_cache
        inputs = {k: v for k, v in inputs.items() if v is not None}
        embeds = inputs.get("inputs_embeds")
        ids = inputs.pop("input_ids", None)
        if ids is None and embeds is None:
            raise ValueError("a stream needs input_ids or inputs_embeds for its prompt")
        if embeds is not None and not use_cache:
            raise ValueError(
                "a prompt given as inputs_embeds can only be decoded with the KV cache "
                "(use_cache=True): a re-run would need the embeddings of the new tokens too"
            )
        rows, length = (ids if ids is not None else embeds).shape[:2]
        device = (ids if ids is not None else embeds).device
        if inputs.get("attention_mask") is None:
            inputs["attention_mask"] = torch.ones(rows, length, dtype=torch.long, device=device)
        # Generated tokens are appended here; a prompt given as embeddings has no ids.
        self.ids = ids if ids is not None else torch.empty(rows, 0, dtype=torch.long, device=device)
        self.prompt_ids = ids
        self.kwargs = {**inputs, "use_cache": use_cache}
        if "position_ids" not in self.kwargs:
            self.kwargs["position_ids"] = model._prepare_position_ids_for_generation(
                ids if ids is not None else embeds, self.kwargs
            )
        self._first = True

    @property
    def rows(self) -> int:
        return self.ids.shape[0]

    def prefill(self) -> Any:
        """The prompt's forward: (rows, vocab) float32 logits at the last position (by default:
        what :meth:`read` hands back)."""
        self._first = True
        return self._forward(None)

    def feed(self, tokens: Tensor) -> Any:
        """Append one token per row and run the model on it (on everything, without cache)."""
        self.ids = torch.cat([self.ids, tokens[:, None].to(self.ids)], 1)
        return self._forward(1 if self.use_cache else None)

    def _forward(self, next_length: int | None) -> Any:
        model = self.model
        inputs = model.prepare_inputs_for_generation(
            self.ids,
            next_sequence_length=next_length,
            is_first_iteration=self._first,
            **self.kwargs,
        )
        out = model(**inputs, return_dict=True)
        self._first = False
        self.kwargs = model._update_model_kwargs_for_generation(out, self.kwargs)
        return self.read(out)

    def read(self, out) -> Any:
        """What a step hands back from the forward's output: (rows, vocab) float32 logits at the
        last position (a subclass may read more, e.g. hidden states)."""
        return out.logits[:, -1].to(copy=True, dtype=torch.float32)


class Arms(Protocol):
    """Two arms over the same B samples: each step, both arms' (B, vocab) logits."""

    prompt_ids: Tensor | None  # (B, L): what returned sequences start with (None: new tokens)

    def prefill(self) -> tuple[Tensor, Tensor]: ...

    def feed(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Feed the same (B,) tokens to both arms; their next logits."""
        ...


class SharedBatch:
    """Both arms in one stream of 2B rows: arm *a* rows ``[:B]``, arm *b* rows ``[B:]``."""

    def __init__(self, stream: Stream):
        if stream.rows % 2:
            raise ValueError(f"a shared batch needs 2B rows, got {stream.rows}")
        self.stream = stream
        self.samples = stream.rows // 2
        ids = stream.prompt_ids
        self.prompt_ids = None if ids is None else ids[: self.samples]

    def _split(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        return logits[: self.samples], logits[self.samples :]

    def prefill(self) -> tuple[Tensor, Tensor]:
        return self._split(self.stream.prefill())

    def feed(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        return self._split(self.stream.feed(torch.cat([tokens, tokens])))


class SeparateArms:
    """Each arm its own stream (own prompt, own cache): e.g. arm *b* without the image."""

    def __init__(self, a: Stream, b: Stream):
        if a.rows != b.rows:
            raise ValueError(f"the arms decode {a.rows} and {b.rows} rows; they must match")
        self.a, self.b = a, b
        self.prompt_ids = a.prompt_ids

    def prefill(self) -> tuple[Tensor, Tensor]:
        return self.a.prefill(), self.b.prefill()

    def feed(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        return self.a.feed(tokens), self.b.feed(tokens)


def doubled(value):
    """Repeat batched inputs (tensors, lists) so rows ``[:B]`` and ``[B:]`` hold the same."""
    if torch.is_tensor(value) and value.dim() > 0:
        return torch.cat([value, value])
    if isinstance(value, list | tuple):
        return value + value
    return value
