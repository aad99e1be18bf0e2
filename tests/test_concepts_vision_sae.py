"""inspect, catalog and ms on a vision-encoder SAE (Matryoshka at ``vision_tower:0`` of the tiny
LLaVA): image features read where the SAE was trained, no text side, group levels shown,
``--pooling cls`` on the CLS token, and its refusal elsewhere."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _concepts_support import GROUPS, collect_store, concepts_env, vision_env  # noqa: F401
from PIL import Image
from safetensors.torch import save_file

import vlsae_guard
from vlsae_guard.backends.hf import HFInputs
from vlsae_guard.cli import main
from vlsae_guard.concepts import ConceptsError, pairwise_monosemanticity
from vlsae_guard.concepts.catalog import build_catalog, read_catalog
from vlsae_guard.concepts.inspect import inspect_rows, read_tokens
from vlsae_guard.concepts.ms_store import store_images, store_monosemanticity
from vlsae_guard.core.checkpoint import load
from vlsae_guard.core.sae_config import SAEConfig, Source
from vlsae_guard.pipeline.store import ActivationStore


def layer0_output(clip, pixels) -> torch.Tensor:
    """Layer 0's output tokens for one image: a forward hook on the CLIP vision model's first
    layer while the vision model alone runs on the pixels."""
    seen = {}

    def on_output(module, args, out):
        seen["out"] = out[0] if isinstance(out, tuple) else out

    encoder = getattr(clip, "vision_model", clip).encoder  # transformers 5 has no vision_model
    hook = encoder.layers[0].register_forward_hook(on_output)
    try:
        with torch.no_grad():
            clip(pixels.to(clip.dtype))
    finally:
        hook.remove()
    return seen["out"][0].float()


def tower_output(model, inputs, image) -> torch.Tensor:
    """transformers' LLaVA: layer 0's output for one image, preprocessed as collection does."""
    pixels = inputs.batch([image], [inputs.image_prompt()])["pixel_values"]
    return layer0_output(model.model.vision_tower, pixels)


def image(env, i: int):
    return Image.open(env.root / f"{i}.png").convert("RGB")


def test_tokens_are_the_vision_towers_layer_output_cls_first(vision_env, hf_model_and_processor):  # noqa: F811
    model, processor = hf_model_and_processor
    inputs = HFInputs(processor)
    sae = load(vision_env.sae)
    img = image(vision_env, 3)
    rows = read_tokens(model, inputs, sae, img)
    assert set(rows) == {"vision"}
    torch.testing.assert_close(rows["vision"], tower_output(model, inputs, img))
    assert len(rows["vision"]) == 1 + 7 * 7  # CLS, then the 28 / 4 = 7 x 7 patches
    # The store was collected there too: image 3's rows are the same tokens.
    store = ActivationStore(vision_env.store)
    t = store.load(0, ("vision", "vision_pair"))
    torch.testing.assert_close(t["vision"][t["vision_pair"] == 3].float(), rows["vision"])
    with pytest.raises(ConceptsError, match="reads images only: give an image"):
        read_tokens(model, inputs, sae, text="a red circle")
    with_text = read_tokens(model, inputs, sae, img, "a red circle")
    assert set(with_text) == {"vision"}  # the text is not read


def test_tokens_of_the_original_llava_package(vision_env, llava_model_and_tokenizer):  # noqa: F811
    from vlsae_guard.backends.original import LlavaInputs

    model, tokenizer = llava_model_and_tokenizer
    tower = model.get_vision_tower()
    inputs = LlavaInputs(tokenizer, tower.image_processor, model.config)
    img = image(vision_env, 4)
    rows = read_tokens(model, inputs, load(vision_env.sae), img)["vision"]
    pixels = inputs.batch([img], [inputs.image_prompt()])["images"]
    torch.testing.assert_close(rows, layer0_output(tower.vision_tower, pixels))
    assert len(rows) == 1 + 7 * 7


@pytest.mark.parametrize("pooling", ["mean", "max", "cls"])
def test_inspect_rows_pools_and_shows_group_levels(vision_env, pooling):  # noqa: F811
    sae = load(vision_env.sae)
    t = ActivationStore(vision_env.store).load(0, ("vision", "vision_pair"))
    rows = t["vision"][t["vision_pair"] == 2].float()
    dense = sae.encode(rows)
    codes = sae.encode_topk(rows)
    assert (codes.values == 0).any()  # spare slots: rows keep different numbers of concepts
    pooled = {"mean": dense.mean(0), "max": dense.amax(0), "cls": dense[0]}[pooling]
    result = inspect_rows(sae, rows, "vision", pooling=pooling, top=50)
    assert result.tokens == (1 if pooling == "cls" else len(rows))
    assert result.active == int((pooled > 0).sum())  # counts values > 0, not code slots
    want = pooled[pooled > 0].sort(descending=True).values
    torch.testing.assert_close(torch.tensor([h.activation for h in result.top]), want)
    group_of = sae.group_of()
    assert [h.group for h in result.top] == [int(group_of[h.concept]) for h in result.top]
    assert {h.group for h in result.top} <= set(range(len(GROUPS)))
    counted = dense[:1] if pooling == "cls" else dense
    assert [h.tokens for h in result.top] == [
        int((counted[:, h.concept] > 0).sum()) for h in result.top
    ]
    assert all("group" in h for h in result.to_json()["top"])


def test_group_levels_only_for_matryoshka(concepts_env, vision_env):  # noqa: F811
    flat = vlsae_guard.build(
        SAEConfig(
            architecture="batchtopk",
            d_in=vision_env.d,
            n_concepts=16,
            k=3,
            source=Source(site="vision_tower", layer=0),
        )
    )
    rows = torch.randn(5, vision_env.d)
    result = inspect_rows(flat, rows, "vision", pooling="cls")
    assert result.top and all(h.group is None for h in result.top)
    assert all("group" not in h for h in result.to_json()["top"])
    vl = load(concepts_env.sae)
    assert all("group" not in h for h in inspect_rows(vl, rows, "vision").to_json()["top"])


def test_inspect_cli_lists_groups_and_skips_the_text(vision_env, tiny_hf_dir, tmp_path, capsys):  # noqa: F811
    base = ["inspect", "--sae", str(vision_env.sae), "--model", str(tiny_hf_dir)]
    out = tmp_path / "inspect.json"
    argv = [*base, "--image", str(vision_env.root / "1.png"), "--text", "a red circle"]
    assert main([*argv, "--json", str(out), "--top", "3"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"vision {vision_env.root / '1.png'}: 50 vision tokens")
    assert "group" in printed.splitlines()[1]
    assert "text 'a red circle': not read, the matryoshka SAE reads images only" in printed
    assert "guard:" not in printed
    report = json.loads(out.read_text())
    assert set(report) == {"vision", "notes"}
    assert all(isinstance(h["group"], int) for h in report["vision"]["top"])

    assert main([*base, "--image", str(vision_env.root / "1.png"), "--pooling", "cls"]) == 0
    assert "1 vision tokens" in capsys.readouterr().out
    assert main([*base, "--text", "a red circle"]) == 2
    assert "reads images only: give an image" in capsys.readouterr().err


def test_catalog_reads_images_only_and_shows_group_levels(vision_env, tmp_path, capsys):  # noqa: F811
    store = ActivationStore(vision_env.store)
    sae = load(vision_env.sae)
    group_of = sae.group_of()
    for pooling in ("mean", "cls"):
        catalog = build_catalog(store, sae, top_n=3, label_docs=3, pooling=pooling)
        assert catalog.text_skipped == "the matryoshka SAE reads images only"
        assert catalog.concepts and catalog.pooling == pooling
        pooled = {}  # first pair of each image -> its pooled activations, from the shards
        for p in range(len(store.shards)):
            t = store.load(p, ("vision", "vision_pair"))
            for pair in t["vision_pair"].unique().tolist():
                dense = sae.encode(t["vision"][t["vision_pair"] == pair])
                pooled[pair] = dense[0] if pooling == "cls" else dense.mean(0)
        del pooled[10]  # a second pair of image 0
        for c in catalog.concepts:
            assert c.group == int(group_of[c.concept])
            assert c.caption_count is None and c.captions == []
            values = torch.stack([a[c.concept] for a in pooled.values()])
            want = values[values > 0].sort(descending=True).values[:3]
            got = torch.tensor([i.activation for i in c.images])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            assert c.image_count == int((values > 0).sum())

    argv = ["catalog", "--sae", str(vision_env.sae), "--store", str(vision_env.store)]
    assert main([*argv, "--out", str(tmp_path / "c"), "--top-n", "2"]) == 0
    printed = capsys.readouterr().out
    assert "captions not read: the matryoshka SAE reads images only" in printed
    raw = json.loads((tmp_path / "c" / "catalog.json").read_text())
    assert raw["text_skipped"] and all("group" in c for c in raw["concepts"])
    assert read_catalog(tmp_path / "c" / "catalog.json").concepts[0].group is not None
    page = (tmp_path / "c" / "index.html").read_text()
    assert "captions not read" in page and "; group " in page


def test_store_must_come_from_the_sae_site(concepts_env, vision_env):  # noqa: F811
    """The tiny model's vision tower and projector have the same width: the site tells."""
    projector_store = ActivationStore(concepts_env.store)
    with pytest.raises(ConceptsError, match="collected at projector.*trained at vision_tower:0"):
        build_catalog(projector_store, load(vision_env.sae))
    with pytest.raises(ConceptsError, match=r"collected at vision_tower:0.*trained at projector"):
        build_catalog(ActivationStore(vision_env.store), load(concepts_env.sae))


def write_embeddings(env, path, d=5, seed=0) -> torch.Tensor:
    images = store_images(ActivationStore(env.store))
    emb = torch.randn(len(images), d, generator=torch.Generator().manual_seed(seed))
    save_file({"embeddings": emb}, path, metadata={"ids": json.dumps([i for _, _, i in images])})
    return emb


def test_ms_cls_equals_the_definition_on_the_cls_rows(
    vision_env,  # noqa: F811
    hf_model_and_processor,
    tmp_path,
    capsys,
):
    model, processor = hf_model_and_processor
    inputs = HFInputs(processor)
    sae = load(vision_env.sae)
    emb = write_embeddings(vision_env, tmp_path / "emb.safetensors")
    # By hand: each image's CLS token from the vision tower, its SAE code, the pairwise sum.
    cls = torch.stack([tower_output(model, inputs, image(vision_env, i))[0] for i in range(10)])
    codes = sae.encode(cls).double()
    want = pairwise_monosemanticity(codes, emb.double())
    assert (~torch.isnan(want)).sum() >= 3
    argv = ["ms", "--sae", str(vision_env.sae), "--store", str(vision_env.store)]
    argv += ["--embeddings", str(tmp_path / "emb.safetensors"), "--out", str(tmp_path / "ms")]
    assert main([*argv, "--pooling", "cls"]) == 0
    printed = capsys.readouterr().out
    assert "(cls pooling)" in printed and "sae group 0" in printed
    record = json.loads((tmp_path / "ms" / "ms.json").read_text())
    assert record["pooling"] == "cls"
    got = torch.tensor([math.nan if s is None else s for s in record["scores"]["sae"]])
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5, equal_nan=True)
    raw = pairwise_monosemanticity(cls.double(), emb.double())  # the baseline: raw CLS neurons
    got_raw = torch.tensor([math.nan if s is None else s for s in record["scores"]["raw_neurons"]])
    torch.testing.assert_close(got_raw, raw.float(), rtol=1e-4, atol=1e-5, equal_nan=True)
    group_of = sae.group_of()
    assert record["concept_groups"] == group_of.tolist()
    best = record["summary"]["sae"]["best"]
    assert best["group"] == int(group_of[best["unit"]])
    for g, size in enumerate(GROUPS):
        s = record["summary"][f"sae group {g}"]
        assert s["units"] == size
        if s["best"] is not None:
            assert s["best"]["group"] == g and group_of[s["best"]["unit"]] == g
    result = store_monosemanticity(
        ActivationStore(vision_env.store), sae, tmp_path / "emb.safetensors", "cls"
    )
    torch.testing.assert_close(
        result.scores.float(), want.float(), rtol=1e-4, atol=1e-5, equal_nan=True
    )


def test_cls_is_refused_away_from_the_vision_tower(
    concepts_env,  # noqa: F811
    vision_env,  # noqa: F811
    tiny_hf_dir,
    hf_model_and_processor,
    tmp_path,
    capsys,
):
    projector_sae = load(concepts_env.sae)
    with pytest.raises(ConceptsError, match="only the vision tower's tokens have.*projector"):
        inspect_rows(projector_sae, torch.randn(4, concepts_env.d), "vision", pooling="cls")
    emb = tmp_path / "emb.safetensors"
    write_embeddings(concepts_env, emb)
    argv = ["ms", "--sae", str(concepts_env.sae), "--store", str(concepts_env.store)]
    argv += ["--embeddings", str(emb), "--out", str(tmp_path / "ms"), "--pooling", "cls"]
    assert main(argv) == 2
    assert "trained at projector (use mean or max)" in capsys.readouterr().err
    assert not (tmp_path / "ms" / "ms.json").exists()
    base = ["inspect", "--sae", str(concepts_env.sae), "--model", str(tiny_hf_dir)]
    assert main([*base, "--image", str(concepts_env.root / "1.png"), "--pooling", "cls"]) == 2
    assert "only the vision tower's tokens have" in capsys.readouterr().err

    # A vision-tower store that kept a random subsample of each image's tokens has no sure CLS.
    sampled = collect_store(
        vision_env.root,
        tiny_hf_dir,
        hf_model_and_processor,
        "sampled",
        site="vision_tower:0",
        tokens_per_image=5,
        limit=3,
    )
    with pytest.raises(ConceptsError, match="kept 5 random tokens per image"):
        build_catalog(sampled, load(vision_env.sae), pooling="cls")


def test_vl_sae_ms_record_is_unchanged(concepts_env, tmp_path, capsys):  # noqa: F811
    emb = tmp_path / "emb.safetensors"
    write_embeddings(concepts_env, emb)
    argv = ["ms", "--sae", str(concepts_env.sae), "--store", str(concepts_env.store)]
    assert main([*argv, "--embeddings", str(emb), "--out", str(tmp_path / "ms")]) == 0
    assert "group" not in capsys.readouterr().out
    record = json.loads((tmp_path / "ms" / "ms.json").read_text())
    assert set(record) == {"images", "pooling", "summary", "scores"}
    assert set(record["summary"]) == {"sae", "raw neurons"}
    assert set(record["summary"]["sae"]["best"]) == {"unit", "score"}
