"""Cue masking: the asked object's *cues* taken out of the image tokens, found by concepts.

Object hallucination in LVLMs is mostly a prior failure: the image holds a ball, the captions
the model learned from nearly always name a kite with a ball, and it says "yes" to "Is there a
kite?" although nothing in the image tokens is a kite (docs/testbed.md: probes read no kite
there). Amplifying visual evidence cannot remove that; a contrast against an arm without the image
removes the cue with everything else and adds the prior back as if it were evidence. Cue masking
removes only the trigger of the prior, for the one question that it would bias:

1. the prompt names an object o (the last object of the object map it names);
2. the object map (:class:`~vlsae_guard.core.object_evidence.ObjectConcepts`, fitted on
   captioned images) lists o's cues: objects c that the captions name o with (P(o | c) >=
   ``min_conditional``, lift >= ``min_lift``);
3. for each cue detected in the image (its concept evidence, pooled over the image's tokens,
   reaches what ``recall_floor`` of held-out images holding c reach), the image tokens where
   c's concepts fire (token evidence above ``token_share`` of the image's largest) are replaced
   (``fill``) by the SAE's concept-free token (the vision decoder's bias: what the SAE decodes
   from no active concept), or by the mean of the image's unmasked tokens (its background);
4. the language model then answers about o from an image with everything but o's cue.

One forward pass at the projector, as the projector guard; nothing changes when the prompt
names no mapped object, the object has no cue, or no cue is in the image. Related: counterfactual
VQA (Niu et al., CVPR 2021) removes the language-prior path to decide on the evidence's effect;
ProjectAway (Jiang et al., 2024) removes object information from image tokens. Deviations: a
question that names several objects is asked about the last one; plurals and synonyms are not
matched; tokens are masked whole (a cue that overlaps o hides that part of o too).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import Tensor

from .intervention import GuardConfig
from .object_evidence import ObjectConcepts, pooled_codes
from .sae import SparseAutoencoder


class PromptObjects:
    """Which object of the map a prompt asks about, read off its text tokens."""

    def __init__(self, tokenizer, names: list[str]):
        self.names, self.tokenizer = list(names), tokenizer
        longest_first = sorted(self.names, key=len, reverse=True)
        alternatives = "|".join(re.escape(n.lower()) for n in longest_first)
        self._pattern = re.compile(rf"\b({alternatives})\b")
        self._index = {n.lower(): i for i, n in enumerate(self.names)}

    def asked(self, input_ids: Tensor, keep: Tensor) -> list[int | None]:
        """Per sample, the index of the last object its prompt's text names (None: none)."""
        out = []
        for ids, mask in zip(input_ids, keep, strict=True):
            text = self.tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True)
            found = self._pattern.findall(text.lower())
            out.append(self._index[found[-1]] if found else None)
        return out


def object_map_path(config: GuardConfig, sae_source: str | os.PathLike | None) -> Path:
    """Where cue masking reads its object map: ``config.objects``, else ``objects.json`` in the
    SAE checkpoint's directory."""
    if config.objects is not None:
        return Path(config.objects)
    if sae_source is None or not os.path.isdir(sae_source):
        raise ValueError(
            "mode 'cue-mask' needs objects=PATH (the object map, objects.json) when the SAE is "
            "not a checkpoint directory"
        )
    return Path(sae_source) / "objects.json"


class CueMask:
    """The intervention: ``mask(feats, counts, asked)`` returns the image tokens with each asked
    object's detected cues replaced (``config.fill``). ``prompts`` (with a ``tokenizer``) reads
    the asked object off a prompt; a caller that knows it already (vLLM's processor) needs none.
    """

    def __init__(
        self, sae: SparseAutoencoder, config: GuardConfig, objects: ObjectConcepts, tokenizer=None
    ):
        if objects.n_concepts != sae.n_concepts:
            raise ValueError(
                f"the object map was fitted on {objects.n_concepts} concepts, the SAE has "
                f"{sae.n_concepts}"
            )
        self.sae, self.config, self.objects = sae, config, objects
        self.names = names = list(objects.objects)
        self.prompts = None if tokenizer is None else PromptObjects(tokenizer, names)
        self.weights = objects.weight_matrix(sae.dtype, sae.device)  # objects x concepts
        self.thresholds = torch.tensor(
            [objects.objects[c].threshold(config.recall_floor) for c in names]
        )
        self.cues = [
            [names.index(c) for c in objects.cues(o, config.min_conditional, config.min_lift)]
            for o in names
        ]

    @torch.no_grad()
    def __call__(self, feats: Tensor, counts: Tensor, asked: list[int | None]) -> Tensor | None:
        """``feats``: the projector's output (rows x tokens x d, or tokens x d for one row);
        ``counts``: rows per sample; ``asked``: per sample, the object its prompt names.
        None when nothing is masked (the output is then left as it is, bit for bit)."""
        if len(asked) != len(counts):
            raise ValueError(f"{len(asked)} prompts for {len(counts)} samples")
        if not any(a is not None and self.cues[a] for a in asked):
            return None
        shape, dtype = feats.shape, feats.dtype
        x = feats.reshape(-1, shape[-1]).to(self.sae.device, self.sae.dtype)
        codes = self.sae.encode_topk(x, "vision")
        tokens = x.shape[0] // int(counts.sum())
        owners = torch.repeat_interleave(torch.arange(len(counts)), counts * tokens)
        owners = owners.to(x.device)
        pooled = pooled_codes(codes, owners, len(counts))
        token: dict[int, Tensor] = {}  # cue -> its evidence on every row, computed once
        hide = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for s, o in enumerate(asked):
            for c in self.cues[o] if o is not None else ():
                if float(pooled[s] @ self.weights[c]) < float(self.thresholds[c]):
                    continue  # the cue is not in this image
                if c not in token:
                    token[c] = (codes.values * self.weights[c][codes.indices]).sum(-1)
                own = owners == s
                evidence = torch.where(own, token[c], torch.zeros_like(token[c]))
                top = evidence.max()
                hide |= own & (evidence > 0) & (evidence > self.config.token_share * top)
        if not hide.any():
            return None
        fill = self.sae.decoder_for("vision").bias.expand_as(x)
        if self.config.fill == "background":
            fill = self._background(x, hide, owners, len(counts), fill)
        out = torch.where(hide.unsqueeze(-1), fill, x)
        return out.to(feats.device, dtype).reshape(shape)

    @staticmethod
    def _background(x: Tensor, hide: Tensor, owners: Tensor, n: int, fallback: Tensor) -> Tensor:
        """Per token, the mean of its sample's unmasked tokens (``fallback`` where a sample has
        none left)."""
        kept = (~hide).to(x.dtype).unsqueeze(-1)
        sums = x.new_zeros(n, x.shape[-1]).index_add_(0, owners, x * kept)
        counts = x.new_zeros(n, 1).index_add_(0, owners, kept)
        means = sums / counts.clamp_min(1)
        return torch.where(counts[owners] > 0, means[owners], fallback)
