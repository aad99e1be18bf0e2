"""Collection throughput: ``vlsae-guard collect`` against the official one-pair approach.

Both run on the same tiny LLaVA (built here, llava-hf layout) and the same generated images and
captions, at site ``layer:L`` with mean pooling (the paper's features), in one process:

* ours: :func:`vlsae_guard.pipeline.collect.collect`: batched forward passes that a hook at
  layer L's input ends (layers L.. and the LM head never run), images decoded in threads,
  shards written;
* official: for each pair, preprocess it alone and call ``generate(max_new_tokens=1)`` with a
  hook recording layer L's input (the VL-SAE repository's collector), then take the means.

Both timings include opening the images and preprocessing; model loading is excluded from both.
The features are compared too (they must agree). Then a VL-SAE is trained on a projector-site
store of the same pairs and its training steps/s printed.

The tiny model has 2 decoder layers of width 64, so its numbers measure per-pair overheads
(Python, preprocessing, generation machinery) much more than matmuls; on a 7B model on a GPU the
gain comes from batching, not from the few layers above L that are skipped.

Usage: ``python benchmarks/perf_collect.py [--pairs 64 --batch-size 16 --layer 1]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from vlsae_guard.backends import detect
from vlsae_guard.backends.hf import HFInputs
from vlsae_guard.lab import tiny
from vlsae_guard.lab.demo import make_scenes
from vlsae_guard.pipeline.collect import CollectConfig, collect
from vlsae_guard.pipeline.store import ActivationStore
from vlsae_guard.pipeline.train import TrainConfig, train


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=64, help="image-caption pairs")
    p.add_argument("--batch-size", type=int, default=16, help="ours: pairs per forward pass")
    p.add_argument("--layer", type=int, default=1, help="site layer:L")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def official(model, processor, pairs: list[dict], root: Path, layer: int) -> dict:
    """One pair at a time through generate(max_new_tokens=1), a hook on layer L's input."""
    backend = detect(model)
    captured = {}

    def hook(module, args, kwargs):
        captured.setdefault("hidden", args[0] if args else kwargs["hidden_states"])

    handle = backend.decoder_layers()[layer].register_forward_pre_hook(hook, with_kwargs=True)
    image_id = model.config.image_token_id
    out = {}
    try:
        for i, pair in enumerate(pairs):
            image = Image.open(root / pair["image"]).convert("RGB")
            prompt = f"USER: <image>\n{pair['caption']} ASSISTANT:"
            inputs = processor(images=[image], text=[prompt], return_tensors="pt")
            captured.clear()
            with torch.inference_mode():
                model.generate(**inputs, max_new_tokens=1, do_sample=False)
            hidden = captured["hidden"][0]
            mask = inputs["input_ids"][0] == image_id
            last = int(mask.nonzero().max())
            out[i] = (hidden[mask].mean(0), hidden[last + 1 :].mean(0))
    finally:
        handle.remove()
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from transformers import __version__ as transformers_version

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = tiny.build_hf_llava(root / "model", seed=args.seed)
        model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
        processor = AutoProcessor.from_pretrained(model_dir)
        pairs = []
        for i, scene in enumerate(make_scenes(args.pairs, seed=args.seed)):
            scene.image.save(root / f"{i}.png")
            pairs.append({"image": f"{i}.png", "caption": scene.caption})
        (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))

        def config(out: str, site: str, pooling: str) -> CollectConfig:
            return CollectConfig(
                model=str(model_dir),
                out=root / out,
                data={"format": "jsonl", "path": root / "pairs.jsonl"},
                site=site,
                pooling=pooling,
                batch_size=args.batch_size,
                progress=False,
            )

        inputs = HFInputs(processor)
        collect(config("warmup", f"layer:{args.layer}", "mean"), model=model, inputs=inputs)
        official(model, processor, pairs[:2], root, args.layer)  # warm-up
        ours = collect(config("ours", f"layer:{args.layer}", "mean"), model=model, inputs=inputs)
        started = time.perf_counter()
        reference = official(model, processor, pairs, root, args.layer)
        t_official = time.perf_counter() - started

        store = ActivationStore(root / "ours")
        diff = 0.0
        for position in range(len(store.shards)):
            data = store.load(position)
            for row, index in enumerate(data["vision_pair"].tolist()):
                v, t = reference[index]
                diff = max(diff, float((data["vision"][row] - v).abs().max()))
                diff = max(diff, float((data["text"][row] - t).abs().max()))

        projector = collect(config("projector", "projector", "token"), model=model, inputs=inputs)
        manifest = projector.manifest
        result = train(
            TrainConfig(
                store=root / "projector",
                out=root / "sae",
                n_concepts=512,
                k=32,
                epochs=3,
                batch_size=256,
                lr=1e-3,
                progress=False,
            )
        )
        steps_per_s = statistics.median(h["steps_per_second"] for h in result.history[1:])

    p_official = args.pairs / t_official
    print(
        f"collect, tiny LLaVA (2 layers, d=64, 49 image tokens), site layer:{args.layer}, mean "
        f"pooling, {args.pairs} pairs, CPU {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, transformers {transformers_version}; one run each, same process"
    )
    rows = [
        (
            f"ours: vlsae-guard collect (batch {args.batch_size}, stops at layer {args.layer})",
            f"{ours.pairs_per_second:8.1f} pairs/s",
        ),
        ("official: one pair per generate(max_new_tokens=1)", f"{p_official:8.1f} pairs/s"),
        ("speed-up", f"{ours.pairs_per_second / p_official:8.1f} x"),
        ("max |ours - official| feature difference", f"{diff:8.1e}"),
        (
            "train: VL-SAE, 512 concepts, k=32, 256 rows per modality per step",
            f"{steps_per_s:8.1f} steps/s",
        ),
    ]
    for label, value in rows:
        print(f"  {label:<72}{value}")
    print(
        f"  (training on the projector-site store of the same pairs: "
        f"{manifest.counts.vision_rows} vision + {manifest.counts.text_rows} text rows)"
    )


if __name__ == "__main__":
    main()
