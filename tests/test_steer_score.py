"""The steering score (Pach et al., 2025) on the tiny LLaVA with a tiny CLIP scorer: the number
against a hand computation, steering against the plain model, batching, the CLI and its errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from _support import one_thread  # noqa: F401

from vlsae_guard import SAEConfig, Source, build
from vlsae_guard.backends import detect, load
from vlsae_guard.cli import main
from vlsae_guard.concepts import steer_score as steer_score_module
from vlsae_guard.concepts.pooled import ConceptsError
from vlsae_guard.concepts.steer_score import (
    PROMPT,
    ClipScorer,
    SteerScoreConfig,
    image_source,
    run_steer_score,
    steer_score,
)
from vlsae_guard.core.checkpoint import load as load_sae
from vlsae_guard.harness.generation import Decoding
from vlsae_guard.lab import tiny

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::vlsae_guard.GuardFitWarning"),  # random SAEs fit badly
]
# Clamped to 100, concept 40 of the SAE below makes the tiny model answer "same" for every image.
CONCEPTS = [40, 115]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random CLIPModel with a byte-level CLIP tokenizer (no merges) and an image processor."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    directory = tmp_path_factory.mktemp("tiny-clip")
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    tokenizer.save_pretrained(directory)
    ids = {"bos_token_id": len(vocab) - 2, "eos_token_id": len(vocab) - 1}
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    config = CLIPConfig(
        text_config={**small, **ids, "pad_token_id": ids["eos_token_id"], "vocab_size": len(vocab),
                     "num_attention_heads": 2, "max_position_embeddings": 32},
        vision_config={**small, "num_attention_heads": 2, "image_size": 28, "patch_size": 7},
        projection_dim=16,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(directory)
    crop = {"height": 28, "width": 28}
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size=crop).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def loaded(tiny_hf_dir):
    return load(str(tiny_hf_dir), torch.float32, "cpu")


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory, loaded):
    """A random Matryoshka SAE at vision_tower:L, L the layer the tiny LLaVA reads."""
    backend = detect(loaded.model)
    width = backend.vision_width()
    source = Source(site="vision_tower", layer=backend.vision_feature_layer())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sae = build(
            SAEConfig(
                architecture="matryoshka", d_in=width, n_concepts=4 * width, k=8,
                groups=[width, 3 * width], source=source,
            )
        )  # fmt: skip
    sae.threshold.fill_(0.05)
    directory = tmp_path_factory.mktemp("vision-sae")
    sae.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("steer-images")
    for i, image in enumerate(tiny.make_images(6, seed=1)):
        image.save(directory / f"img{i}.png")
    return directory


@pytest.fixture(scope="module")
def settings(tiny_hf_dir, sae_dir, clip_dir, image_dir):
    return {
        "model": str(tiny_hf_dir),
        "sae": str(sae_dir),
        "scorer": str(clip_dir),
        "images": image_dir,
        "top_images": 3,
        "batch_size": 2,
    }


def score(loaded, settings, **changes):
    config = SteerScoreConfig(**{**settings, **changes})
    sae = load_sae(config.sae).eval()
    images = image_source(config.images)
    scorer = ClipScorer(config.scorer)
    return run_steer_score(loaded.model, loaded.inputs, sae, scorer, config, images, images)


@pytest.fixture(scope="module")
def result(loaded, settings):
    return score(loaded, settings, concepts=CONCEPTS)


def test_the_score_is_the_hand_computation(result, clip_dir, image_dir):
    """Each word and top image embedded alone (no padding), cosines in float64 by hand."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    processor = AutoImageProcessor.from_pretrained(clip_dir)

    def text(word):
        return model.get_text_features(**tokenizer([word], return_tensors="pt")).pooler_output[0]

    def image(name):
        pixels = processor(
            images=[Image.open(image_dir / name).convert("RGB")], return_tensors="pt"
        )
        return model.get_image_features(**pixels).pooler_output[0]

    def cos(words, reference):
        return sum(F.cosine_similarity(text(w).double(), reference, dim=0) for w in words) / len(
            words
        )

    differences = []
    with torch.no_grad():
        for concept in result.concepts:
            reference = torch.stack([image(i) for i in concept.top_images]).double().mean(0)
            steered, plain = cos(concept.words, reference), cos(result.unsteered_words, reference)
            assert concept.cos_steered == pytest.approx(float(steered), abs=1e-5)
            assert concept.cos_unsteered == pytest.approx(float(plain), abs=1e-5)
            differences.append(float(steered - plain))
    assert [c.concept for c in result.concepts] == CONCEPTS
    assert [c.group for c in result.concepts] == [0, 1]  # groups of 64 and 192 concepts
    assert result.score == pytest.approx(sum(differences) / len(differences), abs=1e-5)
    assert result.score == pytest.approx(result.cos_steered - result.cos_unsteered)


@pytest.fixture(scope="module")
def cls_codes(loaded, sae_dir, image_dir):
    """(image names, SAE codes of their CLS rows at vision_tower:L), independently of SiteReader:
    the vision tower's hidden states."""
    from PIL import Image

    names = sorted(p.name for p in image_dir.iterdir())
    images = [Image.open(image_dir / n).convert("RGB") for n in names]
    batch = loaded.inputs.batch(images, [loaded.inputs.image_prompt()] * len(images))
    sae = load_sae(sae_dir).eval()
    with torch.no_grad():
        tower = detect(loaded.model).vision_tower()
        out = tower(batch["pixel_values"], output_hidden_states=True)
        return names, sae.encode(out.hidden_states[sae.config.source.layer + 1][:, 0])


def test_top_images_are_the_most_active_on_the_cls_token(result, cls_codes):
    names, activations = cls_codes
    for concept in result.concepts:
        column = activations[:, concept.concept]
        order = column.sort(descending=True, stable=True).indices[:3]
        expected = [names[i] for i in order.tolist() if column[i] > 0]
        assert concept.top_images == expected
        assert concept.top_activations == pytest.approx(column[order[: len(expected)]].tolist())


def test_top_picks_the_most_active_concepts(loaded, settings, cls_codes):
    totals = cls_codes[1].sum(0)
    picked = score(loaded, settings, top=2)
    assert [c.concept for c in picked.concepts] == totals.sort(descending=True).indices[:2].tolist()


def test_steering_changes_words_and_unsteered_words_are_the_plain_answers(result, loaded):
    hooks = sum(len(m._forward_hooks) for m in detect(loaded.model).vision_layers())
    assert any(c.words != result.unsteered_words for c in result.concepts)
    assert set(result.concepts[0].words) == {"same"}
    images = image_source(result.image_sets["steer_images"].path)
    pictures = [images.load_image(p) for p in images.pairs]
    answers = loaded.generate(pictures, [PROMPT] * len(pictures), Decoding(5).kwargs())
    assert [a.split()[0] if a.split() else "" for a in answers] == result.unsteered_words
    assert sum(len(m._forward_hooks) for m in detect(loaded.model).vision_layers()) == hooks


def test_batch_size_three_equals_one(loaded, settings):
    same_in_any_batch(
        score(loaded, settings, concepts=CONCEPTS, batch_size=1),
        score(loaded, settings, concepts=CONCEPTS, batch_size=3),
    )


@pytest.mark.parametrize("family", ["next", "llava"])
def test_batch_size_three_equals_one_in_the_other_families(family, settings, request):
    """LLaVA-NeXT tiles images of different sizes into different numbers of crops: a batch is
    padded; the original llava package has a generate() of its own."""
    if family == "llava":
        pytest.importorskip("llava", reason="original LLaVA not installed")
    model = request.getfixturevalue(f"tiny_{family}_dir")
    one, three = (
        steer_score(
            SteerScoreConfig(**{**settings, "model": str(model), "batch_size": b}, concepts=[40])
        )
        for b in (1, 3)
    )
    same_in_any_batch(one, three)
    assert one.concepts[0].words != one.unsteered_words


def same_in_any_batch(one, three):
    assert one.unsteered_words == three.unsteered_words
    for a, b in zip(one.concepts, three.concepts, strict=True):
        assert (a.top_images, a.words) == (b.top_images, b.words)
        assert a.difference == pytest.approx(b.difference, abs=1e-6)
    assert one.score == pytest.approx(three.score, abs=1e-6)


def test_images_from_json_lines(tmp_path, image_dir):
    lines = [
        {"image": str(image_dir / "img1.png"), "id": "a"},
        {"image": str(image_dir / "img0.png")},
    ]
    (tmp_path / "images.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    source = image_source(tmp_path / "images.jsonl")
    assert [p.id for p in source.pairs] == ["a", str(image_dir / "img0.png")]
    assert source.load_image(source.pairs[0]).mode == "RGB"


def test_the_cli_writes_the_score_with_its_settings(settings, tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--model", settings["model"], "--sae", settings["sae"], "--scorer", settings["scorer"],
             "--images", str(settings["images"]), "--concepts", "40", "--top-images", "3",
             "--value", "100", "--pre-zero", "--out", str(out)]  # fmt: skip
    assert main(["steer-score", *flags]) == 0
    assert "steering score" in capsys.readouterr().out
    record = json.loads((out / "steer_score.json").read_text())
    assert record["settings"]["value"] == 100.0 and record["settings"]["pre_zero"] is True
    assert record["settings"]["keep_error"] is False and record["settings"]["concepts"] == [40]
    assert record["prompt"] == PROMPT
    assert record["decoding"] == {"strategy": "greedy", **Decoding(5).kwargs()}
    assert all(len(record[f"{k}_sha256"]) == 64 for k in ("model", "sae", "scorer"))
    assert "packages" in record["environment"]
    assert [c["concept"] for c in record["result"]["concepts"]] == [40]
    assert main(["steer-score", *flags]) == 2  # the results are not overwritten
    assert "not empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sae": "projector SAE"}, "trained at projector"),
        ({"concepts": [10**6]}, "out of range for an SAE with 256 concepts"),
        ({"images": "empty folder"}, "no images"),
        ({"scorer": "llava"}, "a 'llava' model; the steering score embeds words"),
        ({"scorer": "empty folder"}, "not a transformers model folder"),
    ],
)
def test_inputs_that_do_not_fit_are_refused_before_the_model_loads(
    change, message, settings, tiny_sae_dir, tiny_hf_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(steer_score_module, "load", lambda *a: pytest.fail("the model loaded"))
    named = {"projector SAE": tiny_sae_dir, "llava": tiny_hf_dir, "empty folder": tmp_path}
    change = {k: str(named.get(v, v)) if isinstance(v, str) else v for k, v in change.items()}
    config = SteerScoreConfig(**{**settings, **change})
    with pytest.raises(ConceptsError, match=message):
        steer_score(config)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in config.model_dump().items()
             if k in ("model", "sae", "scorer", "images")]  # fmt: skip
    concepts = ["--concepts", *map(str, config.concepts)] if config.concepts else []
    assert main(["steer-score", *flags, *concepts, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_settings_are_validated():
    base = {"model": "m", "sae": "s", "scorer": "c", "images": "i"}
    with pytest.raises(ValueError, match="concepts or top"):
        SteerScoreConfig(**base, concepts=[1], top=3)
    with pytest.raises(ValueError, match="vision_tower:L"):
        SteerScoreConfig(**base, site="projector")
    with pytest.raises(ValueError, match="distinct"):
        SteerScoreConfig(**base, concepts=[1, 1])
    assert SteerScoreConfig(**base, site="vision_tower:01").site == "vision_tower:1"


def test_a_site_the_model_does_not_read_is_refused_before_any_work(loaded, settings):
    from vlsae_guard import GuardError

    with pytest.raises(GuardError, match="reads its image features from the output of vision"):
        score(loaded, settings, concepts=[40], site="vision_tower:2")
