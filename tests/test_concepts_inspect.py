"""inspect: the top concepts of one image or text, and the guard's kept/removed split."""

from __future__ import annotations

import json

import pytest
import torch
from _concepts_support import concepts_env  # noqa: F401
from PIL import Image

from vlsae_guard.backends import detect
from vlsae_guard.backends.hf import HFInputs
from vlsae_guard.cli import main
from vlsae_guard.concepts.inspect import inspect_rows, read_tokens
from vlsae_guard.core.checkpoint import load
from vlsae_guard.core.intervention import GuardConfig, ProjectorIntervention
from vlsae_guard.core.sae import VLSAE, Codes
from vlsae_guard.core.sae_config import SAEConfig


def projector_output(model, processor, image):
    """The projector's output for one image, read with a plain forward hook."""
    seen = {}
    hook = detect(model).projector().register_forward_hook(lambda m, a, out: seen.update(out=out))
    try:
        with torch.no_grad():
            model(**processor(images=[image], text=["<image>"], return_tensors="pt"))
    finally:
        hook.remove()
    return seen["out"].reshape(-1, seen["out"].shape[-1])


@pytest.mark.parametrize("pooling", ["mean", "max"])
def test_top_concepts_match_encoding_the_projector_output(
    concepts_env,  # noqa: F811
    hf_model_and_processor,
    pooling,
):
    model, processor = hf_model_and_processor
    sae = load(concepts_env.sae)
    image = Image.open(concepts_env.root / "3.png").convert("RGB")
    rows = read_tokens(model, HFInputs(processor), sae, image)["vision"]
    expected_rows = projector_output(model, processor, image)
    torch.testing.assert_close(rows, expected_rows)
    dense = sae.encode(expected_rows)  # (tokens, K), zeros outside each token's TopK
    pooled = dense.mean(0) if pooling == "mean" else dense.amax(0)
    result = inspect_rows(sae, rows, "vision", pooling=pooling, top=5)
    assert result.tokens == len(rows) and result.active == int((pooled > 0).sum())
    want = pooled.topk(5)
    assert [h.concept for h in result.top] == want.indices.tolist()
    torch.testing.assert_close(torch.tensor([h.activation for h in result.top]), want.values)
    assert [h.tokens for h in result.top] == [int((dense[:, c] > 0).sum()) for c in want.indices]


@pytest.mark.parametrize("settings", [{}, {"rewrite": "edit"}, {"text_grounded": True}])
def test_kept_removed_split_is_the_interventions(
    concepts_env,  # noqa: F811
    hf_model_and_processor,
    settings,
):
    """Decoding only the concepts inspect calls kept gives exactly the guard's output."""
    model, processor = hf_model_and_processor
    sae = load(concepts_env.sae)
    image = Image.open(concepts_env.root / "5.png").convert("RGB")
    text = "a red circle and a blue square"
    tokens = read_tokens(model, HFInputs(processor), sae, image, text)
    x, t = tokens["vision"], tokens["text"]
    config = GuardConfig(alpha=1.0, **settings)
    result = inspect_rows(sae, x, "vision", guard=config, text_rows=t)
    kept = {h.concept for h in result.kept}
    removed = {h.concept for h in result.removed}
    assert kept and removed and not kept & removed
    assert len(kept) + len(removed) == result.active
    shared = set(sae.config.shared_concepts)
    assert kept <= shared
    if not settings.get("text_grounded"):
        assert removed.isdisjoint(shared)

    intervention = ProjectorIntervention.build(sae, config)
    text_masks = intervention.text_concepts([t]) if config.text_grounded else None
    owners = torch.zeros(len(x), dtype=torch.long) if config.text_grounded else None
    guarded = intervention(x, owners, text_masks)
    codes = sae.encode_topk(x)
    keep = torch.isin(codes.indices, torch.tensor(sorted(kept)))
    decoder = sae.decoder_for("vision")
    if config.rewrite == "replace":
        mine = decoder.sparse(Codes(codes.values * keep, codes.indices, codes.n_concepts))
    else:
        dropped = Codes(codes.values * ~keep, codes.indices, codes.n_concepts)
        mine = x - decoder.sparse(dropped, bias=False)
    torch.testing.assert_close(mine, guarded)


def test_inspect_cli_image_text_labels_and_json(concepts_env, tiny_hf_dir, tmp_path, capsys):  # noqa: F811
    env = concepts_env
    catalog = tmp_path / "cat"
    assert (
        main(["catalog", "--sae", str(env.sae), "--store", str(env.store), "--out", str(catalog)])
        == 0
    )
    capsys.readouterr()
    labels = {
        c["concept"]: c["label"]
        for c in json.loads((catalog / "catalog.json").read_text())["concepts"]
    }
    out = tmp_path / "inspect.json"
    base = ["inspect", "--sae", str(env.sae), "--model", str(tiny_hf_dir)]
    argv = [*base, "--image", str(env.root / "2.png"), "--catalog", str(catalog / "catalog.json")]
    assert main([*argv, "--text", "a green triangle", "--json", str(out), "--top", "4"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert set(report) == {"vision", "text"}
    top = report["vision"]["top"]
    assert len(top) == 4 and top[0]["activation"] >= top[-1]["activation"]
    assert all(h["label"] == labels.get(h["concept"]) for h in top)
    assert f"#{top[0]['concept']}" in printed and "guard: keeps" in printed and "removed" in printed
    assert report["text"]["kept"] == [] and report["text"]["top"]

    assert main([*base, "--text", "a red circle"]) == 0  # text alone
    printed = capsys.readouterr().out
    assert printed.startswith("text 'a red circle':") and "guard:" not in printed


def test_inspect_cli_errors(concepts_env, tiny_hf_dir, tmp_path, capsys):  # noqa: F811
    env = concepts_env
    base = ["inspect", "--sae", str(env.sae), "--model", str(tiny_hf_dir)]
    assert main(base) == 2
    assert "--image" in capsys.readouterr().err
    assert main([*base, "--image", str(tmp_path / "none.png")]) == 2
    err = capsys.readouterr().err
    assert "--image" in err and "none.png" in err
    (tmp_path / "bad.png").write_text("not an image")
    assert main([*base, "--image", str(tmp_path / "bad.png")]) == 2
    assert "bad.png: not readable as an image" in capsys.readouterr().err
    (tmp_path / "cat.json").write_text('{"format": "something else"}')
    assert main([*base, "--text", "x", "--catalog", str(tmp_path / "cat.json")]) == 2
    assert "cat.json: not a concept catalog" in capsys.readouterr().err
    other = VLSAE(SAEConfig(d_in=env.d + 1, n_concepts=8, k=2))
    other.save_pretrained(tmp_path / "other")
    assert (
        main(
            [
                "inspect",
                "--sae",
                str(tmp_path / "other"),
                "--model",
                str(tiny_hf_dir),
                "--text",
                "x",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "trained for another model" in err and f"{env.d + 1}" in err
