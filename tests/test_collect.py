"""Collection: what the rows are, that the model stops at the site, resume, skips, the store."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from _support import one_thread, write_store  # noqa: F401
from safetensors.torch import load_file

from vlsae_guard.backends import detect
from vlsae_guard.backends.hf import HFInputs
from vlsae_guard.cli import main
from vlsae_guard.lab import tiny
from vlsae_guard.pipeline.collect import CollectConfig, SiteReader, collect
from vlsae_guard.pipeline.distributed import Dist
from vlsae_guard.pipeline.store import ActivationStore, StoreError, StoreWriter, read_manifest

pytestmark = pytest.mark.usefixtures("one_thread")
CAPTIONS = [
    "a red circle",
    "a big blue square on the left",
    "green",
    "a small yellow triangle near a dog",
    "two cats",
    "the sky",
    "a person holding an umbrella in the street",
]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    """Seven generated images with captions of different lengths (padding differs)."""
    root = tmp_path_factory.mktemp("pairs")
    lines = []
    for i, (img, caption) in enumerate(zip(tiny.make_images(7, seed=3), CAPTIONS, strict=True)):
        img.save(root / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": caption, "id": f"img{i}"}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "pairs.jsonl"


def run(model_and_processor, model_dir, pairs_file, out, dist=None, **settings):
    model, processor = model_and_processor
    settings.setdefault("batch_size", 3)
    config = CollectConfig(
        model=str(model_dir),
        out=out,
        data={"format": "jsonl", "path": pairs_file},
        progress=False,
        **settings,
    )
    return collect(config, model=model, inputs=HFInputs(processor), dist=dist)


def rows_by_pair(store_dir: Path) -> dict[str, dict[int, torch.Tensor]]:
    """{modality: {pair index: rows}} over all shards of a store."""
    out: dict[str, dict[int, torch.Tensor]] = {"vision": {}, "text": {}}
    for file in sorted((store_dir / "shards").glob("*.safetensors")):
        t = load_file(file)
        for m in out:
            for index in t[f"{m}_pair"].unique().tolist():
                out[m][index] = t[m][t[f"{m}_pair"] == index]
    return out


@pytest.fixture(scope="module")
def reference_model(hf_model_and_processor):
    """A private copy for ``output_hidden_states``: transformers then hooks every decoder layer
    of the model for good, which the session model (checked for leftover hooks) must not get."""
    return copy.deepcopy(hf_model_and_processor[0])


def manual_layer_input(model, processor, image, caption, layer):
    """(image positions, text positions after the image) of layer ``layer``'s input, alone."""
    prompt = f"USER: <image>\n{caption} ASSISTANT:"
    inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[layer][0]
    image_mask = inputs["input_ids"][0] == model.config.image_token_id
    last = image_mask.nonzero().max()
    return hidden[image_mask], hidden[last + 1 :]


def test_layer_site_equals_manual_forward(
    hf_model_and_processor, reference_model, tiny_hf_dir, pairs_file, tmp_path
):
    processor = hf_model_and_processor[1]
    images = tiny.make_images(7, seed=3)
    for pooling in ("token", "mean"):
        result = run(
            hf_model_and_processor,
            tiny_hf_dir,
            pairs_file,
            tmp_path / pooling,
            site="layer:1",
            pooling=pooling,
        )
        assert result.manifest.prompt == "USER: <image>\n{caption} ASSISTANT:"
        assert (result.manifest.layer, result.manifest.point) == (1, "input")  # its pre-hook
        rows = rows_by_pair(tmp_path / pooling)
        for i in (0, 3, 6):
            vision, text = manual_layer_input(reference_model, processor, images[i], CAPTIONS[i], 1)
            if pooling == "mean":
                vision, text = vision.mean(0, keepdim=True), text.mean(0, keepdim=True)
            assert rows["vision"][i].shape == vision.shape
            torch.testing.assert_close(rows["vision"][i], vision, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(rows["text"][i], text, atol=1e-5, rtol=1e-5)


def test_projector_site_rows(hf_model_and_processor, tiny_hf_dir, pairs_file, tmp_path):
    model, processor = hf_model_and_processor
    result = run(hf_model_and_processor, tiny_hf_dir, pairs_file, tmp_path / "s")
    assert (result.manifest.site, result.manifest.point) == ("projector", None)
    rows = rows_by_pair(tmp_path / "s")
    image = tiny.make_images(7, seed=3)[4]
    seen = []
    hook = detect(model).projector().register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            model(**processor(images=[image], text=["USER: <image>\nhi"], return_tensors="pt"))
    finally:
        hook.remove()
    torch.testing.assert_close(rows["vision"][4], seen[0][0])
    ids = processor.tokenizer(CAPTIONS[4], add_special_tokens=False, return_tensors="pt")
    embeds = model.get_input_embeddings()(ids.input_ids)[0]
    torch.testing.assert_close(rows["text"][4], embeds)
    assert rows["vision"][4].shape == (49, 64) and len(rows["text"][4]) == ids.input_ids.shape[1]


def test_batched_equals_one_at_a_time(hf_model_and_processor, tiny_hf_dir, pairs_file, tmp_path):
    for bs in (1, 4):
        run(
            hf_model_and_processor,
            tiny_hf_dir,
            pairs_file,
            tmp_path / str(bs),
            site="layer:1",
            batch_size=bs,
            pairs_per_shard=7,
        )
    one, four = rows_by_pair(tmp_path / "1"), rows_by_pair(tmp_path / "4")
    for m in ("vision", "text"):
        assert one[m].keys() == four[m].keys() == set(range(7))
        for i in range(7):
            torch.testing.assert_close(one[m][i], four[m][i], atol=1e-5, rtol=1e-5)


def test_stops_at_the_site(hf_model_and_processor, tiny_hf_dir, pairs_file, tmp_path):
    """Layers from L up and the LM head never run; at the projector site, no layer does."""
    model, _ = hf_model_and_processor
    layers = detect(model).decoder_layers()
    calls = {name: 0 for name in ("layer0", "layer1", "lm_head")}

    def counter(name):
        def hook(*_):
            calls[name] += 1

        return hook

    modules = {"layer0": layers[0], "layer1": layers[1], "lm_head": model.lm_head}
    hooks = [m.register_forward_hook(counter(n)) for n, m in modules.items()]
    try:
        run(hf_model_and_processor, tiny_hf_dir, pairs_file, tmp_path / "a", site="layer:1")
        assert calls == {"layer0": 3, "layer1": 0, "lm_head": 0}  # 7 pairs in batches of 3
        run(hf_model_and_processor, tiny_hf_dir, pairs_file, tmp_path / "b")
        assert calls == {"layer0": 3, "layer1": 0, "lm_head": 0}
    finally:
        for h in hooks:
            h.remove()


def test_layer_out_of_range(hf_model_and_processor, tiny_hf_dir, pairs_file, tmp_path):
    with pytest.raises(ValueError, match="layer 2 does not exist: the language model has 2"):
        run(hf_model_and_processor, tiny_hf_dir, pairs_file, tmp_path / "x", site="layer:2")


def test_resume_after_kill(hf_model_and_processor, tiny_hf_dir, pairs_file, tmp_path, monkeypatch):
    """Killed in shard 1: shard 0 is kept, the partial shard is discarded, nothing counts twice,
    and the result equals an uninterrupted run."""
    settings = dict(site="layer:1", batch_size=2, pairs_per_shard=3, tokens_per_image=5)
    run(hf_model_and_processor, tiny_hf_dir, pairs_file, tmp_path / "whole", **settings)

    calls = []
    original = SiteReader.__call__

    def dying(self, images, captions, indices):
        calls.append(indices)
        if len(calls) == 4:  # shard 0 = batches 1-2, shard 1 = batches 3-4: die in shard 1
            (tmp_path / "cut/shards/000001.safetensors.tmp").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        return original(self, images, captions, indices)

    monkeypatch.setattr(SiteReader, "__call__", dying)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run(hf_model_and_processor, tiny_hf_dir, pairs_file, cut, **settings)
    assert sorted(p.name for p in (cut / "shards").iterdir()) == [
        "000000.safetensors",
        "000001.safetensors.tmp",
    ]
    assert not read_manifest(cut).complete
    with pytest.raises(StoreError, match="not complete"):
        ActivationStore(cut)
    kept = (cut / "shards/000000.safetensors").stat().st_mtime_ns

    calls.clear()
    result = run(hf_model_and_processor, tiny_hf_dir, pairs_file, cut, **settings)
    assert calls == [[3, 4], [5], [6]]  # only shards 1 and 2 were collected again
    assert (cut / "shards/000000.safetensors").stat().st_mtime_ns == kept
    assert not list((cut / "shards").glob("*.tmp"))
    m = result.manifest
    assert m.complete and (m.counts.pairs, m.counts.kept) == (7, 7)
    assert (m.counts.vision_rows, len(m.shards)) == (35, 3)
    whole, resumed = rows_by_pair(tmp_path / "whole"), rows_by_pair(cut)
    for modality in whole:
        assert whole[modality].keys() == resumed[modality].keys() == set(range(7))
        for i in range(7):
            assert torch.equal(whole[modality][i], resumed[modality][i])


def test_resume_refuses_other_settings(hf_model_and_processor, tiny_hf_dir, pairs_file, tmp_path):
    run(hf_model_and_processor, tiny_hf_dir, pairs_file, tmp_path / "s", limit=2)
    with pytest.raises(StoreError) as e:
        run(hf_model_and_processor, tiny_hf_dir, pairs_file, tmp_path / "s", limit=2, seed=1)
    assert "seed: store has 0, this run 1" in str(e.value)
    (tmp_path / "other").mkdir()
    (tmp_path / "other/file.txt").write_text("x")
    with pytest.raises(StoreError, match="not empty"):
        run(hf_model_and_processor, tiny_hf_dir, pairs_file, tmp_path / "other", limit=2)


def test_missing_and_unreadable_images_skipped(
    hf_model_and_processor, tiny_hf_dir, pairs_file, tmp_path, caplog
):
    lines = pairs_file.read_text().splitlines()
    (tmp_path / "bad.png").write_bytes(b"\x89PNG but not really")
    lines.insert(1, json.dumps({"image": "gone.png", "caption": "x", "id": "gone"}))
    lines.insert(4, json.dumps({"image": str(tmp_path / "bad.png"), "caption": "y", "id": "bad"}))
    lines.append(json.dumps({"image": "0.png", "caption": "   ", "id": "blank"}))
    file = pairs_file.parent / "with-bad.jsonl"
    file.write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING"):
        result = run(hf_model_and_processor, tiny_hf_dir, file, tmp_path / "s", pairs_per_shard=4)
    counts = result.manifest.counts
    assert (counts.pairs, counts.kept, counts.skipped) == (10, 7, 3)
    assert counts.skipped_by_reason == {"missing": 1, "unreadable": 1, "empty caption": 1}
    assert [(s.id, s.reason) for s in result.manifest.skipped] == [
        ("gone", "missing"),
        ("bad", "unreadable"),
        ("blank", "empty caption"),
    ]
    assert "skipped pair 1 (gone)" in caplog.text
    store = ActivationStore(tmp_path / "s")
    kept = [r["id"] for p in range(len(store.shards)) for r in store.records(p)]
    assert kept == [f"img{i}" for i in range(7)]
    assert store.source(5)["caption"] == CAPTIONS[3]  # index 5 in the file: img3


def test_token_subsampling_is_a_fixed_subset(
    hf_model_and_processor, tiny_hf_dir, pairs_file, tmp_path
):
    run(hf_model_and_processor, tiny_hf_dir, pairs_file, tmp_path / "all")
    for bs in (1, 3):
        run(
            hf_model_and_processor,
            tiny_hf_dir,
            pairs_file,
            tmp_path / f"k{bs}",
            tokens_per_image=6,
            batch_size=bs,
        )
    full, a, b = (rows_by_pair(tmp_path / n)["vision"] for n in ("all", "k1", "k3"))
    for i in range(7):
        assert a[i].shape == (6, 64) and torch.equal(a[i], b[i])
        assert all((full[i] == row).all(-1).any() for row in a[i])
    assert not torch.equal(a[0], full[0][:6])  # random positions, not the first six


def test_ranks_split_shards(hf_model_and_processor, tiny_hf_dir, pairs_file, tmp_path):
    """Rank r of w collects the shards with index % w == r; together they make the whole."""
    settings = dict(pairs_per_shard=2, batch_size=2)
    run(hf_model_and_processor, tiny_hf_dir, pairs_file, tmp_path / "one", **settings)
    out = tmp_path / "two"
    first = run(hf_model_and_processor, tiny_hf_dir, pairs_file, out, Dist(0, 2), **settings)
    assert not first.manifest.complete and first.pairs == 4  # shards 0 and 2
    second = run(hf_model_and_processor, tiny_hf_dir, pairs_file, out, Dist(1, 2), **settings)
    assert second.manifest is None and second.pairs == 3  # shards 1 and 3
    done = run(hf_model_and_processor, tiny_hf_dir, pairs_file, out, Dist(0, 2), **settings)
    assert done.pairs == 0 and done.manifest.complete
    a, b = rows_by_pair(tmp_path / "one"), rows_by_pair(out)
    for m in a:
        assert all(torch.equal(a[m][i], b[m][i]) for i in range(7))


def test_store_header_mismatch_lists_every_field(tmp_path):
    write_store(tmp_path / "s", torch.zeros(4, 3), torch.zeros(4, 3), pairs_per_shard=2)
    header = read_manifest(tmp_path / "s").header()
    other = header.model_copy(update={"pooling": "token", "dims": {"vision": 3, "text": 5}})
    with pytest.raises(StoreError) as e:
        StoreWriter.open(tmp_path / "s", other)
    assert "pooling: store has 'mean', this run 'token'" in str(e.value)
    assert "dims:" in str(e.value)


def test_unreadable_shard_is_collected_again(tmp_path):
    write_store(tmp_path / "s", torch.ones(4, 3), torch.ones(4, 3), pairs_per_shard=2)
    writer = StoreWriter.open(tmp_path / "s", read_manifest(tmp_path / "s").header())
    (tmp_path / "s/shards/000001.safetensors").write_bytes(b"garbage")
    assert writer.done(0) and not writer.done(1)
    assert not (tmp_path / "s/shards/000001.safetensors").exists()


@pytest.mark.llava
def test_original_llava_layer_site(llava_model_and_tokenizer, tiny_llava_dir, pairs_file, tmp_path):
    """The original llava backend: conversation template, batching, right padding."""
    from llava.conversation import conv_templates
    from llava.mm_utils import process_images, tokenizer_image_token

    from vlsae_guard.backends.original import LlavaInputs

    model, tokenizer = llava_model_and_tokenizer
    processor = model.get_vision_tower().image_processor
    config = CollectConfig(
        model=str(tiny_llava_dir),
        out=tmp_path / "s",
        data={"format": "jsonl", "path": pairs_file},
        site="layer:1",
        pooling="mean",
        batch_size=3,
        progress=False,
    )
    inputs = LlavaInputs(tokenizer, processor, model.config)
    collect(config, model=model, inputs=inputs)
    rows = rows_by_pair(tmp_path / "s")
    images = tiny.make_images(7, seed=3)
    for i in (1, 6):
        conv = conv_templates["llava_v1"].copy()
        conv.append_message(conv.roles[0], "<image>\n" + CAPTIONS[i])
        conv.append_message(conv.roles[1], None)
        ids = tokenizer_image_token(conv.get_prompt(), tokenizer, return_tensors="pt")[None]
        pixels = process_images([images[i]], processor, model.config)
        with torch.no_grad():  # on a copy, like reference_model
            outputs = copy.deepcopy(model)(ids, images=pixels, output_hidden_states=True)
        hidden = outputs.hidden_states[1][0]
        slot = int((ids[0] == -200).nonzero())
        vision, text = hidden[slot : slot + 49], hidden[slot + 49 :]
        torch.testing.assert_close(rows["vision"][i][0], vision.mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rows["text"][i][0], text.mean(0), atol=1e-5, rtol=1e-5)


# --- the command line ----------------------------------------------------------------------------


def test_cli_collect_with_config_file(tiny_hf_dir, pairs_file, tmp_path, capsys):
    config = tmp_path / "collect.yaml"
    config.write_text(
        f"model: {tiny_hf_dir}\nsite: layer:0\npooling: mean\nbatch_size: 2\n"
        f"data:\n  format: jsonl\n  path: {pairs_file}\n"
    )
    out = tmp_path / "store"
    argv = ["collect", "--config", str(config), "--out", str(out), "--batch-size", "4"]
    assert main([*argv, "--limit", "5", "--no-progress"]) == 0
    manifest = read_manifest(out)
    assert manifest.complete and manifest.counts.kept == 5 and manifest.layer == 0
    assert manifest.settings["batch_size"] == 4  # the flag overrode the file
    assert "complete: 5 pairs kept, 0 skipped" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--site", "layer:x"],
            "--site (field site): Value error, expected 'projector', 'layer:L'",
        ),
        (["--site", "vision_tower:3"], "vision layer 3 does not exist: "),  # before loading
        (["--tokens-per-image", "0"], "--tokens-per-image (field tokens_per_image): Input should"),
        (["--site", "layer:7"], "layer 7 does not exist: "),  # checked before loading
        (["--jsonl", "/no/such.jsonl"], "--jsonl (field data.path): Path does not point to a file"),
    ],
)
def test_cli_collect_errors(tiny_hf_dir, pairs_file, tmp_path, capsys, extra, message):
    argv = ["collect", "--model", str(tiny_hf_dir), "--out", str(tmp_path / "s")]
    if "--jsonl" not in extra:
        argv += ["--jsonl", str(pairs_file)]
    assert main([*argv, *extra, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlsae-guard collect: error:") and message in err
    assert "Traceback" not in err


def test_llava_next_rows_per_image(next_model_and_processor, tiny_next_dir, pairs_file, tmp_path):
    """LLaVA-NeXT: an image's rows are all its anyres crops, grouped right within a batch."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    model, processor = next_model_and_processor
    for bs in (1, 3):
        run((model, processor), tiny_next_dir, pairs_file, tmp_path / str(bs), batch_size=bs)
    one, three = rows_by_pair(tmp_path / "1"), rows_by_pair(tmp_path / "3")
    cfg = model.config
    for i, image in enumerate(tiny.make_images(7, seed=3)):
        crops = image_size_to_num_patches(
            (image.height, image.width), cfg.image_grid_pinpoints, cfg.vision_config.image_size
        )
        assert one["vision"][i].shape == (crops * 49, 64)
        torch.testing.assert_close(one["vision"][i], three["vision"][i], atol=1e-5, rtol=1e-5)
