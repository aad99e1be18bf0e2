"""Collect paired vision/text activations from a LLaVA model into a sharded store.

Sites (the same ones the guard reads):

* ``projector``: vision = the projector's output tokens; text = the caption's token embeddings
  at the language model's input. Both live in the language model's input space.
* ``layer:L`` (the VL-SAE paper): the prompt ``"<image>\\n{caption}"`` in the model's
  conversation template; vision = the image positions, text = the positions after the image,
  both at the *input* of decoder layer L.
* ``vision_tower:L`` (Pach et al., 2025): the *output* of the vision encoder's layer L, every
  token of every crop (CLS first); no text rows (captions are not read).

Each batch runs one forward pass that a hook at the site ends by raising :class:`_Stop`: the
vision tower and, for ``layer:L``, layers ``0..L-1`` run; layers ``L..`` and the LM head never do.
The official collector ran one pair at a time through ``generate(max_new_tokens=1)``, i.e. the
whole model plus sampling per pair.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from ..backends import (
    Inputs,
    detect,
    load,
    move,
    num_layers,
    num_vision_layers,
    read_model_config,
    resolve_dtype,
)
from ..core.sae_config import vision_tower_layer
from ..provenance import environment, sha256_dir
from ..validation import Settings
from .distributed import Dist
from .pairs import DataConfig, ImageError, Pair, PairSource, open_source
from .store import Header, Manifest, StoreWriter

log = logging.getLogger(__name__)
# Pairs per shard when not given: about 16-300 MB per shard for a 7B model in fp16.
DEFAULT_PAIRS_PER_SHARD = {"mean": 1024, "token": 64, "token_sampled": 512}


class CollectConfig(Settings):
    """Settings of ``vlsae-guard collect`` (a YAML/JSON file, flags, or both)."""

    model: str  # local folder or Hub id of a LLaVA checkpoint
    out: Path
    data: DataConfig
    site: str = "projector"  # "projector", "layer:L" or "vision_tower:L"
    pooling: Literal["token", "mean"] = "token"
    tokens_per_image: int | None = Field(default=None, ge=1)  # random subsample (token pooling)
    batch_size: int = Field(default=16, ge=1)
    pairs_per_shard: int | None = Field(default=None, ge=1)
    limit: int | None = Field(default=None, ge=1)  # only the first N pairs
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = "auto"
    seed: int = 0
    workers: int = Field(default=4, ge=0)  # threads decoding the next batch's images
    prompt: str | None = None  # layer site: a template with {caption}, instead of the model's
    conv_mode: str = "llava_v1"  # original llava package: conversation template
    hash_model: bool = True  # record sha256 of a local model folder in the manifest
    progress: bool = True

    @field_validator("site")
    @classmethod
    def _site(cls, site: str) -> str:
        if site == "projector":
            return site
        name, _, layer = site.partition(":")
        if name not in ("layer", "vision_tower") or not layer.isdigit():
            raise ValueError(
                "expected 'projector', 'layer:L' (decoder layer L's input) or 'vision_tower:L' "
                "(vision encoder layer L's output), L a layer index"
            )
        return f"{name}:{int(layer)}"

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, prompt: str | None) -> str | None:
        if prompt is not None and ("{caption}" not in prompt or "<image>" not in prompt):
            raise ValueError("the prompt template needs both '<image>' and '{caption}'")
        return prompt

    @model_validator(mode="after")
    def _combination(self) -> CollectConfig:
        if self.tokens_per_image is not None and self.pooling == "mean":
            raise ValueError("tokens_per_image subsamples token rows; it has no use with mean")
        if self.prompt is not None and self.layer is None:
            raise ValueError("prompt applies to a layer site only (the projector sees no text)")
        return self

    @property
    def layer(self) -> int | None:
        return int(self.site.split(":")[1]) if self.site.startswith("layer:") else None

    @property
    def vision_layer(self) -> int | None:
        return vision_tower_layer(self.site) if self.site.startswith("vision_tower:") else None

    def shard_pairs(self) -> int:
        if self.pairs_per_shard is not None:
            return self.pairs_per_shard
        if self.pooling == "token":
            sampled = self.tokens_per_image is not None
            return DEFAULT_PAIRS_PER_SHARD["token_sampled" if sampled else "token"]
        return DEFAULT_PAIRS_PER_SHARD["mean"]


class _Stop(Exception):
    """Raised by the site hook so nothing after the site runs."""


class SiteReader:
    """Runs batches up to the collection site; returns each pair's (vision rows, text rows)."""

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        layer: int | None,
        pooling: str = "token",
        tokens_per_image: int | None = None,
        seed: int = 0,
        prompt: str | None = None,
        vision_layer: int | None = None,
    ):
        self.model = model
        self.inputs = inputs
        self.backend = detect(model)
        self.layer = layer
        self.pooling = pooling
        self.tokens_per_image = tokens_per_image
        self.seed = seed
        self.prompt = prompt
        if layer is not None and not 0 <= layer < len(self.backend.decoder_layers()):
            raise ValueError(
                f"layer {layer} does not exist: the language model has "
                f"{len(self.backend.decoder_layers())} decoder layers"
            )
        self.vision_layer = vision_layer
        n_vision = len(self.backend.vision_layers()) if vision_layer is not None else 0
        if vision_layer is not None and not 0 <= vision_layer < n_vision:
            raise ValueError(
                f"vision layer {vision_layer} does not exist: the vision encoder has {n_vision}"
            )
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    @property
    def reads_text(self) -> bool:
        return self.vision_layer is None

    def dims(self) -> dict[str, int]:
        if self.vision_layer is not None:
            return {"vision": self.backend.vision_width(), "text": 0}
        hidden = self.backend.hidden_size()
        vision = self.backend.out_features() if self.layer is None else hidden
        return {"vision": vision, "text": hidden}

    def prompt_for(self, caption: str) -> str:
        if self.prompt is not None:
            return self.prompt.format(caption=caption)
        return self.inputs.caption_prompt(caption)

    @torch.inference_mode()
    def __call__(
        self, images: list, captions: list[str], indices: list[int]
    ) -> list[tuple[Tensor, Tensor]]:
        if self.vision_layer is not None:
            vision = self._projector(images, self.backend.vision_layers()[self.vision_layer])
            text = [torch.zeros(0, 0, dtype=self.dtype)] * len(images)
        elif self.layer is None:
            vision = self._projector(images)
            text = self._embeddings(captions)
        else:
            vision, text = self._layer(images, [self.prompt_for(c) for c in captions])
        return [
            (self._pool(v, index, sample=True), self._pool(t, index))
            for v, t, index in zip(vision, text, indices, strict=True)
        ]

    def _run(self, batch: dict[str, Any], hooks: list) -> None:
        """One forward pass that the site hook is expected to end."""
        try:
            self.model(**move(batch, self.device, self.dtype), use_cache=False)
        except _Stop:
            return
        finally:
            for undo in hooks:
                undo()
        raise RuntimeError("the forward pass never reached the collection site")

    def _projector(self, images: list, vision_layer: nn.Module | None = None) -> list[Tensor]:
        """Each image's projector rows; with ``vision_layer``, that layer's output rows of the
        same crops instead (the projector still runs, to say which crops are whose)."""
        seen: dict[str, Any] = {}

        def on_output(module, args, output):
            seen["out"] = output
            raise _Stop

        def on_vision(module, args, output):
            seen["vision"] = output[0] if isinstance(output, tuple) else output

        hooks = [
            self.backend.capture_prompt(lambda prompt: seen.setdefault("prompt", prompt)),
            self.backend.projector().register_forward_hook(on_output).remove,
        ]
        if vision_layer is not None:
            hooks.append(vision_layer.register_forward_hook(on_vision).remove)
        batch = self.inputs.batch(images, [self.inputs.image_prompt()] * len(images))
        self._run(batch, hooks)
        out = seen["out"]
        out = out if out.dim() == 3 else out.unsqueeze(0)
        counts = self.backend.rows_per_sample(seen["prompt"], out.shape[0], out.shape[1])
        rows = out if vision_layer is None else seen["vision"]
        return [r.reshape(-1, rows.shape[-1]) for r in rows.split(counts.tolist())]

    def _embeddings(self, captions: list[str]) -> list[Tensor]:
        ids = self.inputs.caption_ids(captions)
        width = max(map(len, ids))
        padded = torch.zeros(len(ids), width, dtype=torch.long)
        for i, seq in enumerate(ids):
            padded[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        embeds = self.backend.embed(padded.to(self.device))
        return [embeds[i, : len(seq)] for i, seq in enumerate(ids)]

    def _layer(self, images: list, prompts: list[str]) -> tuple[list[Tensor], list[Tensor]]:
        seen: dict[str, Any] = {}

        def on_layout(image_mask, attention_mask):
            seen.setdefault("layout", (image_mask, attention_mask))

        def on_input(module, args, kwargs):
            seen["hidden"] = args[0] if args else kwargs["hidden_states"]
            raise _Stop

        layer = self.backend.decoder_layers()[self.layer]
        hooks = [
            self.backend.capture_layout(on_layout),
            layer.register_forward_pre_hook(on_input, with_kwargs=True).remove,
        ]
        self._run(self.inputs.batch(images, prompts), hooks)
        hidden = seen["hidden"]
        image_mask, attention = seen["layout"]
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        vision, text = [], []
        for i in range(hidden.shape[0]):
            image = image_mask[i].to(hidden.device)
            if not image.any():
                raise RuntimeError(f"sample {i} of the batch has no image positions")
            after = positions > positions[image].max()
            if attention is not None:
                after &= attention[i].to(hidden.device).bool()
            vision.append(hidden[i][image])
            text.append(hidden[i][after])
        return vision, text

    def _pool(self, rows: Tensor, index: int, sample: bool = False) -> Tensor:
        if self.pooling == "mean":
            return rows.float().mean(0, keepdim=True).to(rows.dtype).cpu()
        k = self.tokens_per_image
        if sample and k is not None and k < len(rows):
            # Seeded by the pair: the same rows whatever the batch, rank or resume point.
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            keep = torch.randperm(len(rows), generator=gen)[:k].sort().values
            rows = rows[keep.to(rows.device)]
        return rows.cpu()


@dataclass
class CollectResult:
    manifest: Manifest | None  # rank 0 only
    pairs: int  # pairs this process went through in this run (kept + skipped)
    kept: int
    skipped: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def pairs_per_second(self) -> float:
        return self.pairs / self.seconds if self.seconds else 0.0


def collect(
    config: CollectConfig,
    *,
    model: nn.Module | None = None,
    inputs: Inputs | None = None,
    source: PairSource | None = None,
    dist: Dist | None = None,
) -> CollectResult:
    """Collect ``config.data`` into ``config.out``, resuming a killed run of the same settings.

    ``model``/``inputs``/``source`` skip loading (tests, notebooks); ``dist`` overrides the
    ``torchrun`` environment (rank ``r`` of ``w`` processes the shards with index ``% w == r``).
    """
    dist = dist or Dist.from_env()
    if model is None:
        model_config = read_model_config(config.model)
        layers = num_layers(model_config)
        if config.layer is not None and layers is not None and config.layer >= layers:
            raise ValueError(f"layer {config.layer} does not exist: {config.model} has {layers}")
        vision = num_vision_layers(model_config)
        if config.vision_layer is not None and vision is not None and config.vision_layer >= vision:
            raise ValueError(
                f"vision layer {config.vision_layer} does not exist: {config.model}'s vision "
                f"encoder has {vision}"
            )
        device = dist.device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        model, inputs = load(config.model, dtype, device, conv_mode=config.conv_mode)
    source = source if source is not None else open_source(config.data)
    if config.limit is not None:
        source = source.head(config.limit)
    reader = SiteReader(
        model,
        inputs,
        config.layer,
        config.pooling,
        config.tokens_per_image,
        config.seed,
        config.prompt,
        config.vision_layer,
    )
    header = _header(config, reader, source)
    if dist.is_main:  # creates or checks the store; the other ranks attach once it exists
        writer = StoreWriter.open(config.out, header)
    dist.barrier()
    if not dist.is_main:
        writer = StoreWriter.open(config.out, header, create=False)
    mine = [j for j in range(header.n_shards) if j % dist.world == dist.rank]
    discarded = writer.discard_partial(mine)
    if discarded:
        log.info("discarded %d partial shard(s) of an interrupted run", discarded)
    todo = [j for j in mine if not writer.done(j)]
    result = _collect_shards(config, reader, source, writer, todo, dist)
    dist.barrier()
    if dist.is_main:
        result.manifest = writer.finalize()
    return result


def _header(config: CollectConfig, reader: SiteReader, source: PairSource) -> Header:
    model_dir = Path(config.model)
    return Header(
        model_id=config.model,
        model_sha256=sha256_dir(model_dir) if config.hash_model and model_dir.is_dir() else None,
        backend=reader.backend.name,
        site=config.site.partition(":")[0],
        layer=config.layer if config.vision_layer is None else config.vision_layer,
        # SiteReader._layer's pre-hook reads a decoder layer's input, a vision layer's output
        point="input" if config.layer is not None else None,
        pooling=config.pooling,
        tokens_per_image=config.tokens_per_image,
        prompt=None if config.layer is None else reader.prompt_for("{caption}"),
        dims=reader.dims(),
        dtype=str(reader.dtype).removeprefix("torch."),
        dataset=source.describe,
        dataset_fingerprint=source.fingerprint(),
        pairs=len(source),
        pairs_per_shard=config.shard_pairs(),
        seed=config.seed,
        settings=config.model_dump(mode="json", exclude={"progress"}),
        environment=environment(),
    )


def _collect_shards(
    config: CollectConfig,
    reader: SiteReader,
    source: PairSource,
    writer: StoreWriter,
    todo: list[int],
    dist: Dist,
) -> CollectResult:
    from tqdm.auto import tqdm

    header = writer.header
    total = sum(stop - start for start, stop in map(header.shard_range, todo))
    result = CollectResult(manifest=None, pairs=0, kept=0)
    bar = tqdm(
        total=total,
        unit="pair",
        desc="collect" + (f" (rank 0 of {dist.world})" if dist.world > 1 else ""),
        disable=not (config.progress and dist.is_main),
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    with bar, ThreadPoolExecutor(max(config.workers, 1)) as pool:
        for index in todo:
            start, stop = header.shard_range(index)
            shard = _ShardRows()
            batches = [
                list(range(i, min(i + config.batch_size, stop)))
                for i in range(start, stop, config.batch_size)
            ]
            for loaded in _prefetch(pool, source, batches, config.workers > 0):
                shard.add(reader, source, loaded, result)
                bar.update(len(loaded))
            writer.write(index, shard.tensors(header), shard.records, shard.skipped)
    result.seconds = time.perf_counter() - started
    return result


def _prefetch(
    pool: ThreadPoolExecutor, source: PairSource, batches: list[list[int]], ahead: bool
) -> Iterator[list[tuple[int, Any]]]:
    """Decode the next batch's images in threads while the current batch runs."""

    def load(index: int) -> Any:
        try:
            return source.load_image(source[index])
        except ImageError as e:
            return e

    def submit(batch: list[int]) -> list[tuple[int, Future]]:
        return [(i, pool.submit(load, i)) for i in batch]

    pending: deque = deque()
    for batch in batches:
        if not ahead:
            yield [(i, load(i)) for i in batch]
            continue
        pending.append(submit(batch))
        if len(pending) > 1:
            yield [(i, f.result()) for i, f in pending.popleft()]
    while pending:
        yield [(i, f.result()) for i, f in pending.popleft()]


class _ShardRows:
    """Rows of one shard as they arrive, with the pair index of every row."""

    def __init__(self):
        self.vision: list[Tensor] = []
        self.text: list[Tensor] = []
        self.vision_pair: list[Tensor] = []
        self.text_pair: list[Tensor] = []
        self.records: list[dict] = []
        self.skipped: list[dict] = []

    def add(
        self,
        reader: SiteReader,
        source: PairSource,
        loaded: list[tuple[int, Any]],
        result: CollectResult,
    ) -> None:
        good: list[tuple[int, Pair, Any]] = []
        for index, image in loaded:
            pair = source[index]
            if isinstance(image, ImageError):
                self._skip(index, pair, image.reason, str(image), result)
            elif reader.reads_text and not pair.caption:
                self._skip(index, pair, "empty caption", "", result)
            else:
                good.append((index, pair, image))
        result.pairs += len(loaded)
        if not good:
            return
        rows = reader([g[2] for g in good], [g[1].caption for g in good], [g[0] for g in good])
        for (index, pair, _), (vision, text) in zip(good, rows, strict=True):
            if reader.reads_text and not len(text):  # a caption of only special tokens
                self._skip(index, pair, "empty caption", "no text tokens", result)
                continue
            self.vision.append(vision)
            self.text.append(text)
            self.vision_pair.append(torch.full((len(vision),), index, dtype=torch.long))
            self.text_pair.append(torch.full((len(text),), index, dtype=torch.long))
            self.records.append(pair.record(index))
            result.kept += 1

    def _skip(self, index: int, pair: Pair, reason: str, detail: str, result: CollectResult):
        self.skipped.append({"index": index, "id": pair.id, "reason": reason})
        result.skipped[reason] += 1
        if sum(result.skipped.values()) <= 20:
            log.warning("skipped pair %s (%s): %s", index, pair.id, detail or reason)

    def tensors(self, header: Header) -> dict[str, Tensor]:
        dtype = getattr(torch, header.dtype)

        def cat(parts: list[Tensor], width: int | None) -> Tensor:
            if parts:
                return torch.cat(parts)
            shape = (0, width) if width is not None else (0,)
            return torch.zeros(shape, dtype=dtype if width is not None else torch.long)

        return {
            "vision": cat(self.vision, header.dims["vision"]),
            "text": cat(self.text, header.dims["text"]),
            "vision_pair": cat(self.vision_pair, None),
            "text_pair": cat(self.text_pair, None),
        }
