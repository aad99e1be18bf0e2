"""``vlsae_llava``: a LLaVA-family model with an inference method, as an lmms-eval model
(settings: :mod:`.settings`)."""

from __future__ import annotations

from typing import Any

from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model

from .. import methods
from ..harness import generation
from . import MODEL_NAME
from .settings import cut, decoding_of, provenance_of, read_model_args

# What decides each model's answers, per model built in this process: lmms-eval's results file
# records only the model_args text, so the launcher writes these beside it.
PROVENANCE: list[dict] = []


@register_model(MODEL_NAME)  # lmms-eval's older registry; 0.7 resolves MODEL_REGISTRY_V2
class VLSAELlava(lmms):
    """LLaVA with an inference method (``none``, ``vlsae``, ``paper``, ``cue-mask``, ``vcd``,
    ...), answering lmms-eval's ``generate_until`` requests."""

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        self.config, self.settings = read_model_args(model_args)
        cfg = self.config
        guarded = methods.spec_of(cfg.arm).needs_sae
        self.generator = generation.load(
            cfg.backend,
            cfg.pretrained,
            cfg.dtype,
            cfg.device,
            cfg.prompt_format,
            sae=cfg.sae if guarded else None,
            config=self.settings if guarded else None,
            seed=cfg.seed,
            options={"engine_args": cfg.engine_args},
            arms={cfg.arm: self.settings},
            image_aspect=cfg.image_aspect,
        )
        self.provenance = provenance_of(cfg, self.settings)
        PROVENANCE.append(self.provenance)

    def generate_until(self, requests) -> list[str]:
        """Answers in request order, batched by identical generation settings."""
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        for positions in groups.values():
            decoding, until = decoding_of(requests[positions[0]].args[1])
            for start in range(0, len(positions), self.config.batch_size):
                batch = positions[start : start + self.config.batch_size]
                texts = [requests[i].args[0] for i in batch]
                images = [self._image(requests[i]) for i in batch]
                said = self.generator.answer(images, texts, decoding, self.config.arm)
                for i, text in zip(batch, said, strict=True):
                    answers[i] = cut(text, until)
        return answers

    def _image(self, request):
        _, _, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if len(visuals) != 1:
            raise ValueError(
                f"vlsae_llava answers with one image per request; {task} document {doc_id} "
                f"has {len(visuals)}"
            )
        return visuals[0].convert("RGB")

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "vlsae_llava generates answers (generate_until); tasks scored by loglikelihood are "
            "not supported"
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vlsae_llava answers single-round tasks only")
