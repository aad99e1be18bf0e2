"""Answer (image, prompt) pairs on a guarded vLLM, guard on or off per request.

Two ways in: :func:`generate_offline` on an offline ``vllm.LLM`` (:func:`load_llm` builds one
with the guard configured), and :func:`generate_openai` against a running ``vlsae-guard serve``
through the ``openai`` client. ``guard`` is one value for all requests or one per request:
``True``/``False`` set ``mm_processor_kwargs["vlsae_guard"]``; ``None`` sends nothing, so the
server's default (``--vlsae-default``, on unless set) applies.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image

from .settings import PREFIX, REQUEST_KEY, ServeSettings

Switch = bool | None


@dataclass(frozen=True)
class Answer:
    text: str
    token_ids: tuple[int, ...]


def request_kwargs(guard: Switch) -> dict:
    """What a request carries to switch the guard (``extra_body`` over HTTP)."""
    return {} if guard is None else {"mm_processor_kwargs": {REQUEST_KEY: guard}}


def _per_request(guard: Switch | Sequence[Switch], n: int) -> list[Switch]:
    if guard is None or isinstance(guard, bool):
        return [guard] * n
    guard = list(guard)
    if len(guard) != n:
        raise ValueError(f"{len(guard)} guard switches for {n} requests")
    return guard


def _pairs(images: Sequence, prompts: Sequence[str]) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")


# --- offline ---------------------------------------------------------------------------------


def load_llm(model: str, settings: ServeSettings | None = None, **llm_kwargs):
    """A ``vllm.LLM`` running the guarded architecture of ``model``.

    The settings are written to this process's ``VLSAE_GUARD_*`` variables (replacing any)
    before the engine starts, because vLLM's engine and worker processes read them from the
    environment they inherit. ``settings=None`` runs the guarded class unconfigured (the
    parent class exactly).
    """
    from vllm import LLM

    from .server import guarded_architecture, model_config

    settings = settings or ServeSettings()
    for key in [k for k in os.environ if k.startswith(PREFIX)]:
        del os.environ[key]
    os.environ.update(settings.to_env())
    overrides = dict(llm_kwargs.pop("hf_overrides", None) or {})
    overrides["architectures"] = [guarded_architecture(model_config(model))]
    return LLM(model=model, hf_overrides=overrides, **llm_kwargs)


def generate_offline(
    llm,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    *,
    guard: Switch | Sequence[Switch] = None,
    max_tokens: int = 16,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
) -> list[Answer]:
    """One answer per (image, prompt); ``prompts`` are full prompts holding ``<image>``
    (the model's conversation format, e.g. ``"USER: <image>\\n{q} ASSISTANT:"``).
    ``top_k`` None or 0: off (vLLM's default, unlike generate()'s 50)."""
    from vllm import SamplingParams

    _pairs(images, prompts)
    params = SamplingParams(
        temperature=temperature, top_p=1.0 if top_p is None else top_p, max_tokens=max_tokens,
        seed=seed, **({"top_k": top_k} if top_k else {}),
    )  # fmt: skip
    requests = [
        {"prompt": p, "multi_modal_data": {"image": im}, **request_kwargs(g)}
        for im, p, g in zip(images, prompts, _per_request(guard, len(prompts)), strict=True)
    ]
    outputs = llm.generate(requests, params, use_tqdm=False)
    return [Answer(o.outputs[0].text, tuple(o.outputs[0].token_ids)) for o in outputs]


# --- OpenAI-compatible server ----------------------------------------------------------------


def image_url(image: Image.Image) -> str:
    """A ``data:`` URL (base64 PNG, lossless) for a chat message's ``image_url`` part."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_messages(image: Image.Image, prompt: str, system: str | None = None) -> list[dict]:
    """One user turn: the image, then the text (the server applies the chat template)."""
    content = [
        {"type": "image_url", "image_url": {"url": image_url(image)}},
        {"type": "text", "text": prompt},
    ]
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": content}]


def openai_client(base_url: str, timeout: float = 300.0, api_key: str | None = None):
    """An ``openai.OpenAI`` for a vLLM server (no retries: a failure should show)."""
    from openai import OpenAI

    key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
    return OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=0)


def generate_openai(
    base_url: str,
    images: Sequence[Image.Image],
    prompts: Sequence[str],
    *,
    guard: Switch | Sequence[Switch] = None,
    model: str | None = None,
    system: str | None = None,
    max_tokens: int = 16,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    concurrency: int = 8,
    timeout: float = 300.0,
    extra_body: dict | None = None,
    client=None,
) -> list[Answer]:
    """One chat completion per (image, prompt) from ``base_url`` (``http://host:port/v1``),
    ``concurrency`` at a time; ``prompts`` are the user's text (no ``<image>``).

    ``extra_body`` adds vLLM request fields (e.g. ``{"add_special_tokens": True}`` when the
    chat template does not start with the BOS token the model was trained with)."""
    _pairs(images, prompts)
    client = client or openai_client(base_url, timeout)
    model = model or client.models.list().data[0].id
    switches = _per_request(guard, len(prompts))

    def one(i: int) -> Answer:
        extra = {**(extra_body or {}), **request_kwargs(switches[i]), "return_token_ids": True}
        if top_k:  # vLLM's sampling field; the OpenAI API has none
            extra["top_k"] = top_k
        response = client.chat.completions.create(
            model=model,
            messages=chat_messages(images[i], prompts[i], system),
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=1.0 if top_p is None else top_p,
            seed=seed,
            extra_body=extra,
        )
        choice = response.choices[0]
        ids = getattr(choice, "token_ids", None) or (choice.model_extra or {}).get("token_ids")
        return Answer(choice.message.content or "", tuple(ids or ()))

    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        return list(pool.map(one, range(len(prompts))))
