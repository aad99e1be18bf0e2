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
    float32|model, --vlsae-log FILE, --dry-run (print the command). Every other flag goes to
    vLLM. Clients switch per request with extra_body={"mm_processor_kwargs": {"vlsae_guard":
    false}} (the server runs with --trust-request-mm-kwargs).
    """
    from ..serving.command import serve
    from ..serving.server import ServeError
    from ..serving.settings import PluginConfigError

    try:
        serve(args.model, args.sae, args.vllm_args)
    except (ServeError, PluginConfigError) as e:
        raise UsageError(str(e)) from e
