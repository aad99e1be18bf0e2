"""PAI on the fused decoding engine: arm *a* attends more to its image, arm *b* has no image.

Liu, Zheng and Chen, "Paying More Attention to Image: A Training-Free Method for Alleviating
Hallucination in LVLMs", ECCV 2024 (arXiv 2407.21771); code LALBJ/PAI. In the decoder layers
``start_layer .. end_layer - 1``, the last query row's pre-softmax attention logits on the image
tokens' keys become ``w + alpha * |w|`` (``attention.py``, ``llama_new_forward``: after the
``1/sqrt(d)`` scaling and the additive mask, before the softmax; nothing is renormalised beyond
the softmax itself; every other query row and key is untouched). The release decodes with the KV
cache, so the rows amplified are the prompt's last position (prefill) and each generated token
(one row per step). Only arm *a* (the prompt with its image) is amplified; arm *b* is the prompt
without its image, decoded plainly (``CFG.py`` switches the amplification off, ``use_cfg``,
around its forward). The arms' scores fuse as :func:`vlsae_guard.decoding.fusions.pai_fuse`,
with the defaults and sources listed on :class:`~vlsae_guard.decoding.fusions.PAISettings`.

The amplification wraps the chosen layers' ``self_attn.forward`` on this model instance only
(:func:`vlsae_guard.backends.base.wrap_method`) and acts only while arm *a*'s stream runs a
forward (:class:`AmplifiedStream`); otherwise the original forward runs, untouched. It is
multiplicative in ``w`` (through ``|w|``), so an additive attention-mask bias cannot express it:
the wrapper computes the attention itself, in eager form (transformers' ``LlamaAttention.forward``
and ``eager_attention_forward``, 5.19), with the amplification between mask and softmax.

Deviations from the released code: the image keys are found per row (``input_ids ==
image_token_id``, or where the original llava package spliced the features), not as one
``img_start_idx:img_end_idx`` span for the whole batch, so a left-padded batch decodes as each
sample alone; arm *a* computes its attention in eager form whatever ``attn_implementation`` the
model has (the same function, other rounding than sdpa); without the KV cache every re-run
amplifies the rows the cached run did (the prompt's last and the generated ones), so both decode
alike; ``end_layer`` None means the last layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..backends import Backend
from ..backends.base import wrap_method
from ..decoding import DecodingOptions, SeparateArms, Stream
from ..decoding.fusions import PAISettings
from .base import MethodError, TwoArmHandle

# Attention modules whose forward is LlamaAttention's (the language models of the LLaVA family),
# and the implementations whose masks the eager form below reads (4D bool, 4D float, or None).
ATTENTION_CLASSES = ("LlamaAttention", "MistralAttention")
IMPLEMENTATIONS = ("eager", "sdpa")


def amplify(scores: Tensor, image_keys: Tensor, alpha: float, first: int) -> Tensor:
    """PAI's amplification, in place: ``w + alpha * |w|`` in the query rows ``first ..`` of
    ``scores`` (batch, heads, queries, keys) at the keys where ``image_keys`` (batch, keys) is
    True."""
    rows = scores[:, :, first:, :]
    chosen = image_keys[:, None, None, :]
    scores[:, :, first:, :] = torch.where(chosen, rows + alpha * rows.abs(), rows)
    return scores


def image_keys_for(image_keys: Tensor, length: int) -> Tensor:
    """The prompt's (batch, L) image-key mask over ``length >= L`` keys (generated keys after)."""
    rows, prompt = image_keys.shape
    if length < prompt:
        raise ValueError(f"the attention sees {length} keys, fewer than the prompt's {prompt}")
    return torch.cat([image_keys, image_keys.new_zeros(rows, length - prompt)], 1)


def amplified_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    image_keys: Tensor,
    alpha: float,
) -> tuple[Tensor, Tensor]:
    """Eager scaled dot-product attention with PAI's amplification between mask and softmax, in
    the query rows of the prompt's last position and of every generated token: with the KV cache
    that is the last row of each forward, as in the released code; a re-run of the whole
    sequence (``use_cache=False``) amplifies the same rows, so it decodes as the cached run.

    ``attention_mask``: transformers' 4D mask, bool (True attends, sdpa's) or additive float
    (eager's), or None (sdpa's causal fast path: causal over the keys, no padding).
    """
    from transformers.models.llama.modeling_llama import repeat_kv

    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * module.scaling
    queries, keys = scores.shape[-2:]
    floor = torch.finfo(scores.dtype).min
    if attention_mask is None:
        if queries > 1:
            causal = torch.ones(queries, keys, dtype=torch.bool, device=scores.device)
            scores = scores.masked_fill(~causal.tril(keys - queries), floor)
    elif attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, floor)
    else:
        scores = scores + attention_mask
    # Query i sits at position keys - queries + i; the prompt's last position is L - 1.
    first = max(0, image_keys.shape[1] - 1 - (keys - queries))
    if first < queries:
        chosen = image_keys_for(image_keys, keys).to(scores.device)
        scores = amplify(scores, chosen, alpha, first)
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def amplified_forward(
    module: nn.Module,
    image_keys: Tensor,
    alpha: float,
    hidden_states: Tensor,
    position_embeddings: tuple[Tensor, Tensor] | None = None,
    attention_mask: Tensor | None = None,
    past_key_values=None,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """``LlamaAttention.forward`` (projections, rotary embedding, cache update, output
    projection) around :func:`amplified_attention`."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    leading = hidden_states.shape[:-1]
    heads = (*leading, -1, module.head_dim)
    query = module.q_proj(hidden_states).view(heads).transpose(1, 2)
    key = module.k_proj(hidden_states).view(heads).transpose(1, 2)
    value = module.v_proj(hidden_states).view(heads).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, module.layer_idx)
    out, weights = amplified_attention(module, query, key, value, attention_mask, image_keys, alpha)
    return module.o_proj(out.reshape(*leading, -1).contiguous()), weights


def check_attention(attentions: Sequence[nn.Module]) -> None:
    """Refuse attention modules the eager form does not reproduce (MethodError)."""
    for attn in attentions:
        name = type(attn).__name__
        if name not in ATTENTION_CLASSES:
            raise MethodError(f"pai amplifies {'/'.join(ATTENTION_CLASSES)}, found {name}")
        implementation = getattr(attn.config, "_attn_implementation", None)
        if implementation not in IMPLEMENTATIONS:
            raise MethodError(
                f"pai reads the attention masks of attn_implementation {IMPLEMENTATIONS}, "
                f"found {implementation!r}; load the model with attn_implementation='sdpa'"
            )


class ImageAttention:
    """PAI's amplification on the given attention modules, active only inside :meth:`on`."""

    def __init__(self, attentions: Sequence[nn.Module], alpha: float):
        self.alpha = alpha
        self.image_keys: Tensor | None = None
        self._undo = [wrap_method(attn, "forward", self._wrapper(attn)) for attn in attentions]

    def _wrapper(self, module: nn.Module) -> Callable[[Callable], Callable]:
        def make(original: Callable) -> Callable:
            def forward(*args, **kwargs):
                if self.image_keys is None:
                    return original(*args, **kwargs)
                return amplified_forward(module, self.image_keys, self.alpha, *args, **kwargs)

            return forward

        return make

    @contextmanager
    def on(self, image_keys: Tensor) -> Iterator[None]:
        """Amplify, within the block, the keys where ``image_keys`` (rows, prompt) is True."""
        previous, self.image_keys = self.image_keys, image_keys
        try:
            yield
        finally:
            self.image_keys = previous

    def remove(self) -> None:
        """Restore every wrapped module exactly; a second call is a no-op."""
        while self._undo:
            self._undo.pop()()


class AmplifiedStream(Stream):
    """A :class:`Stream` whose forwards (prefill and every step) run with ``amplifier`` on."""

    def __init__(self, model, inputs, use_cache, amplifier: ImageAttention, image_keys: Tensor):
        super().__init__(model, inputs, use_cache=use_cache)
        prompt = inputs.get("input_ids")
        prompt = inputs["inputs_embeds"] if prompt is None else prompt
        if image_keys.shape != prompt.shape[:2]:
            shapes = tuple(image_keys.shape), tuple(prompt.shape[:2])
            raise ValueError(f"an image-key mask of {shapes[0]} for a prompt of {shapes[1]}")
        self.amplifier, self.image_keys = amplifier, image_keys.bool()

    def prefill(self) -> Tensor:
        with self.amplifier.on(self.image_keys):
            return super().prefill()

    def feed(self, tokens: Tensor) -> Tensor:
        with self.amplifier.on(self.image_keys):
            return super().feed(tokens)


def image_prompt(backend: Backend, inputs: dict[str, Any]) -> tuple[dict[str, Any], Tensor]:
    """Arm *a*'s prompt inputs and where its image features sit in the language model's sequence:
    where the backend splices them itself (the original llava package), as it reports them
    (:meth:`Backend.capture_layout`), else the placeholder ids (transformers)."""
    seen: list[Tensor] = []
    undo = backend.capture_layout(lambda image_mask, attention_mask: seen.append(image_mask))
    try:
        prompt = backend.prompt_inputs(inputs)
    finally:
        undo()
    if seen:
        image_keys = seen[-1]
    elif prompt.get("input_ids") is not None:
        image_keys = prompt["input_ids"] == backend.image_token_id()
    else:
        raise ValueError("cannot tell where the image tokens are in the prompt")
    if not image_keys.any():
        raise ValueError("PAI amplifies the attention to the image, and no prompt holds one")
    return prompt, image_keys


class PAIHandle(TwoArmHandle):
    """PAI: arm *a* the prompt with its image, attention to it amplified; arm *b* without it."""

    def __init__(self, method: str, model: nn.Module, backend: Backend, settings: PAISettings):
        super().__init__(method, model, backend, settings)
        layers = backend.decoder_layers()
        try:
            chosen = settings.layers(len(layers))
        except ValueError as e:
            raise MethodError(f"{method}: {e}") from e
        attentions = [getattr(layers[i], "self_attn", None) for i in chosen]
        if any(attn is None for attn in attentions):
            raise MethodError(f"{method}: a decoder layer of {backend.name} has no self_attn")
        check_attention(attentions)
        self.amplifier = ImageAttention(attentions, settings.alpha)

    def arms(self, inputs: dict[str, Any], options: DecodingOptions) -> SeparateArms:
        text_only = self.backend.prompt_inputs(self.backend.without_images(inputs))
        prompt, image_keys = image_prompt(self.backend, inputs)
        a = AmplifiedStream(self.model, prompt, options.use_cache, self.amplifier, image_keys)
        return SeparateArms(a, Stream(self.model, text_only, use_cache=options.use_cache))

    def remove(self) -> None:
        self.amplifier.remove()
