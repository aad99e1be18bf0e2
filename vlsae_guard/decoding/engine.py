"""The fused decoding loop: two arms, one fusion, one token per sample fed to both arms.

Each step takes both arms' last-position logits, fuses them (``fuse(logits_a, logits_b, step)
-> scores``, a pure function of the method), chooses **one** token per sample, greedy or sampled,
and feeds it to both arms, so the two always share the prefix the fusion assumes. Finished rows
(an eos token) keep emitting pad, as in generate(); decoding stops when every row has finished.

Sampling applies temperature, top-k and top-p to the fused scores with transformers' own
warpers, in generate()'s order, and draws with one ``torch.Generator`` per sample: a sample's
tokens do not depend on the rest of its batch, so a left-padded batch decodes as each sample
alone. Unset options come from the model's generation config, then generate()'s defaults
(top_k 50 included), so an A/B against ``model.generate`` samples alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from ..validation import FrozenSettings
from .arms import Arms

# fuse(logits_a, logits_b, step) -> scores, all (B, vocab) float32; step counts from 0.
Fusion = Callable[[Tensor, Tensor, int], Tensor]
# on_step(step, tokens, logits_a, logits_b, scores): what the loop chose and from what.
StepCallback = Callable[[int, Tensor, Tensor, Tensor, Tensor], None]


class DecodingOptions(FrozenSettings):
    """generate()'s decoding arguments that the engine implements, resolved and checked."""

    max_new_tokens: int = Field(ge=1)
    min_new_tokens: int = Field(default=0, ge=0)  # eos scores -inf before this many new tokens
    do_sample: bool = False
    temperature: float = Field(default=1.0, gt=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # 0: off
    pad_token_id: int | None = None
    eos_token_id: list[int] = Field(default_factory=list)
    # Sample i draws from a torch.Generator seeded seed + i, or seed[i] given one per sample
    # (a harness seeds each item by its id, so batches and resumes draw as each item alone).
    seed: int | list[int] | None = None
    use_cache: bool = True
    output_scores: bool = False
    output_logits: bool = False  # arm a's raw logits: the model as asked
    return_dict_in_generate: bool = False

    @classmethod
    def resolve(cls, model, **given) -> DecodingOptions:
        """``given`` (None means unset) over the model's generation config over generate()'s
        defaults; raises ValueError naming an argument the engine does not implement."""
        from transformers import GenerationConfig

        given = {k: v for k, v in given.items() if v is not None}
        beams = given.pop("num_beams", 1)
        if beams != 1:
            raise ValueError(f"num_beams={beams}: fused decoding chooses one token per sample")
        unknown = sorted(set(given) - set(cls.model_fields))
        if unknown:
            raise ValueError(
                f"fused decoding does not implement generate() argument(s) {unknown}; it takes "
                f"{sorted(set(cls.model_fields) | {'num_beams', 'generator', 'logits_processor'})}"
            )
        config = getattr(model, "generation_config", None)
        defaults = GenerationConfig._get_default_generation_params()
        out = {}
        for name in ("do_sample", "temperature", "top_p", "top_k", "pad_token_id", "eos_token_id"):
            value = getattr(config, name, None)
            out[name] = defaults.get(name) if value is None else value
        out["max_new_tokens"] = getattr(config, "max_new_tokens", None) or 20
        out = {k: v for k, v in {**out, **given}.items() if v is not None}
        if not out.get("do_sample"):
            for name in ("temperature", "top_p", "top_k"):  # ignored when greedy, as generate()
                out.pop(name, None)
        eos = out.get("eos_token_id", [])
        out["eos_token_id"] = [eos] if isinstance(eos, int) else list(eos)
        if out.get("pad_token_id") is None and out["eos_token_id"]:
            out["pad_token_id"] = out["eos_token_id"][0]
        return cls(**out)


def generators(options: DecodingOptions, samples: int, device) -> list[torch.Generator]:
    """One generator per sample; without a seed, one is drawn from torch's global generator."""
    seed = options.seed
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    if isinstance(seed, int):
        seeds = [seed + i for i in range(samples)]
    elif len(seed) == samples:
        seeds = seed
    else:
        raise ValueError(f"seed: {len(seed)} seeds for {samples} samples")
    out = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(s)
        out.append(g)
    return out


def warpers(options: DecodingOptions) -> list:
    """transformers' temperature, top-k and top-p warpers, as generate() orders them."""
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    out = []
    if options.temperature != 1.0:
        out.append(TemperatureLogitsWarper(options.temperature))
    if options.top_k:
        out.append(TopKLogitsWarper(options.top_k))
    if options.top_p < 1.0:
        out.append(TopPLogitsWarper(options.top_p))
    return out


@torch.no_grad()
def decode(
    arms: Arms,
    fuse: Fusion,
    options: DecodingOptions,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    logits_processor: Sequence[Callable] = (),
    on_step: StepCallback | None = None,
) -> Any:
    """Decode with ``arms`` and ``fuse``: sequences as generate() returns them (prompt + new
    tokens, or the new tokens where the prompt was given as embeddings), or generate()'s output
    object with ``return_dict_in_generate`` (``scores``: the processed scores of each step;
    ``logits``: arm *a*'s raw logits).

    ``generator``: one for every sample (then a batch no longer decodes as each sample alone) or
    one per sample; by default :func:`generators`. ``logits_processor`` run after the fusion,
    with the sequences so far.
    """
    logits_a, logits_b = arms.prefill()
    samples, device = logits_a.shape[0], logits_a.device
    sample = options.do_sample
    if sample:
        if isinstance(generator, torch.Generator):
            generator = [generator] * samples
        draws = list(generator) if generator is not None else generators(options, samples, device)
        if len(draws) != samples:
            raise ValueError(f"{len(draws)} generators for {samples} samples")
    processors = [*logits_processor, *(warpers(options) if sample else [])]
    prompt = arms.prompt_ids
    sequences = prompt if prompt is not None else torch.empty(samples, 0, dtype=torch.long)
    sequences = sequences.to(device)
    eos = torch.tensor(options.eos_token_id, dtype=torch.long, device=device)
    pad = options.pad_token_id
    unfinished = torch.ones(samples, dtype=torch.bool, device=device)
    scores_seen, logits_seen = [], []
    for step in range(options.max_new_tokens):
        scores = fuse(logits_a, logits_b, step)
        if step < options.min_new_tokens and len(eos):  # as generate()'s MinNewTokens processor
            scores = scores.index_fill(-1, eos, -math.inf)
        for processor in processors:
            scores = processor(sequences, scores)
        if sample:
            probs = scores.softmax(-1)
            tokens = torch.cat(
                [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, draws, strict=True)]
            )
        else:
            tokens = scores.argmax(-1)
        if pad is not None:
            tokens = torch.where(unfinished, tokens, pad)
        if on_step is not None:
            on_step(step, tokens, logits_a, logits_b, scores)
        if options.output_scores:
            scores_seen.append(scores)
        if options.output_logits:
            logits_seen.append(logits_a)
        sequences = torch.cat([sequences, tokens[:, None]], 1)
        unfinished &= ~torch.isin(tokens, eos)
        if not unfinished.any() or step + 1 == options.max_new_tokens:
            break
        logits_a, logits_b = arms.feed(tokens)
    if not options.return_dict_in_generate:
        return sequences
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return GenerateDecoderOnlyOutput(
        sequences=sequences,
        scores=tuple(scores_seen) if options.output_scores else None,
        logits=tuple(logits_seen) if options.output_logits else None,
    )


def split_generate_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """generate()'s keyword arguments as (model inputs, decoding arguments).

    Decoding arguments are generate()'s own (every GenerationConfig field, the processors and
    criteria) and the engine's; the rest (pixels, image sizes, masks) go to the model.
    """
    from transformers import GenerationConfig

    own = set(GenerationConfig().to_dict()) | set(DecodingOptions.model_fields)
    own |= {"generation_config", "generator", "logits_processor", "stopping_criteria", "streamer"}
    inputs = {k: v for k, v in kwargs.items() if k not in own}
    return inputs, {k: v for k, v in kwargs.items() if k in own}


def generate_inputs(args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """generate()'s arguments with the prompt's token ids as ``input_ids`` (given positionally,
    as ``input_ids`` or as ``inputs``); raises ValueError otherwise."""
    if len(args) > 1:
        raise ValueError(
            f"generate() takes the input ids as its only positional argument, got {len(args)}; "
            "pass the rest by keyword"
        )
    kwargs = dict(kwargs)
    ids = args[0] if args else kwargs.pop("input_ids", kwargs.pop("inputs", None))
    if not torch.is_tensor(ids):
        raise ValueError("generate() needs input_ids (a tensor) as its first input")
    return {**kwargs, "input_ids": ids}


# arms_for(model inputs, resolved options) -> the two arms of one generate() call.
ArmsFactory = Callable[[dict[str, Any], DecodingOptions], Arms]


def fused_generate(
    model, args: tuple, kwargs: dict[str, Any], arms_for: ArmsFactory, fuse: Fusion, **overrides
) -> Any:
    """A two-arm method's ``generate(*args, **kwargs)``: the arguments split into model inputs
    and decoding options (``overrides`` win, e.g. ``use_cache=False``), then :func:`decode`.

    Raises ValueError (pydantic's included) for arguments the engine cannot honour, before any
    forward pass.
    """
    inputs, decoding = split_generate_kwargs(generate_inputs(args, kwargs))
    generator = decoding.pop("generator", None)
    processors = decoding.pop("logits_processor", None) or ()
    options = DecodingOptions.resolve(model, **decoding)
    if overrides:
        options = options.model_copy(update=overrides)
    return decode(arms_for(inputs, options), fuse, options, generator, processors)
