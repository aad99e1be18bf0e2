"""``serve``: vLLM's OpenAI-compatible server with the guard."""

from __future__ import annotations

import argparse

from .app import UsageError, arg, subcommand


@subcommand(
    "serve",
    "vLLM's OpenAI-compatible server with the guard, switchable per request",
    arg("model", metavar="MODEL", help="LLaVA / LLaVA-NeXT checkpoint (llava-hf layout)"),
    arg("--sae", metavar="DIR", help="VL-SAE checkpoint directory or Hub id (required)"),
    arg("vllm_args", nargs=argparse.REMAINDER, metavar="...", help="guard flags and vLLM flags"),
)
def serve_command(args: argparse.Namespace) -> None:
    """Start `python -m vllm.entrypoints.openai.api_server` for MODEL with the guard.

    Guard flags (anywhere after MODEL): --sae DIR, --vlsae-rewrite replace|edit, --vlsae-alpha A,
    --vlsae-steer JSON, --vlsae-default on|off (requests that do not say), --vlsae-dtype
    float32|model, --vlsae-log FILE, --vlsae-allow-request-kwargs (let clients set other
    processor kwargs and media_io_kwargs, e.g. image size: trusted clients only), --dry-run
    (print the command). Every other flag goes to vLLM.

    The server listens on 127.0.0.1 unless you pass --host; to expose it, pass --host 0.0.0.0
    with --api-key KEY (or VLLM_API_KEY=KEY); vLLM's key leaves some routes open
    (/invocations serves inference too), so put an authenticating proxy in front.
    Clients switch the guard per request with extra_body={"mm_processor_kwargs":
    {"vlsae_guard": false}}, the only request kwarg accepted by default; guard settings
    (alpha, steer, ...) are fixed at start, and requests that set them get HTTP 400.
    """
    from ..serving.server import ServeError
    from ..serving.settings import PluginConfigError
    from .serve_flags import serve

    try:
        serve(args.model, args.sae, args.vllm_args)
    except (ServeError, PluginConfigError) as e:
        raise UsageError(str(e)) from e
