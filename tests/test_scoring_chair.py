"""CHAIR scored like the standard chair.py: vocabulary, special cases, metrics, ground truth."""

import json

import pytest

from vlsae_guard.cli import main
from vlsae_guard.scoring import chair
from vlsae_guard.scoring.files import DataError, data_path


def mentions(caption: str) -> list[str]:
    return chair.vocabulary().caption_to_words(caption).classes


def test_vocabulary_is_the_standard_scorers():
    """Ours, built from synonyms.txt and the rules, equals the one in Maxlinn's chair.pkl."""
    ref = json.loads(data_path("chair", "maxlinn_chair_pkl_vocab.json").read_text())
    vocab = chair.vocabulary()
    assert ref["mscoco_objects"][0] == ""  # the pkl's leading blank line of synonyms_txt
    assert list(vocab.objects) == ref["mscoco_objects"][1:]
    assert dict(vocab.word_to_class) == {k: v for k, v in ref["inverse_synonym_dict"].items() if k}
    assert dict(vocab.double_words) == ref["double_word_dict"]
    assert len(set(vocab.classes)) == 80


@pytest.mark.parametrize(
    "caption, classes",
    [
        ("A hot dog, a teddy bear and a fire hydrant.", ["hot dog", "teddy bear", "fire hydrant"]),
        ("A stop sign under a traffic light.", ["stop sign", "traffic light"]),
        ("Two wine glasses and a wine glass.", ["wine glass", "wine glass"]),
        ("A cell phone and a baseball bat.", ["cell phone", "baseball bat"]),
        ("Baseball gloves.", ["baseball glove"]),
        ("A tennis racket and sports balls.", ["tennis racket", "sports ball"]),
        ("A potted plant by the teddy bears.", ["potted plant", "teddy bear"]),
        # "baby"/"adult" are person synonyms: with an animal they only name the animal
        ("A baby elephant and an adult giraffe.", ["elephant", "giraffe"]),
        ("A baby with a dog.", ["person", "dog"]),
        ("A passenger jet and a passenger train.", ["airplane", "train"]),
        ("Passengers board the train.", ["person", "train"]),
        ("A man in a bow tie.", ["person", "tie"]),
        ("The toilet seat is up.", ["toilet"]),
        ("The seat of the toilet is up.", ["toilet"]),  # no chair when a toilet is there
        ("A seat by the window.", ["chair"]),
        ("Two buses and a bus.", ["bus"]),  # singular "bus" -> "bu": the standard misses it
        ("A motor bike.", []),  # merged, but " motor bike" (double space) is no object word
        ("Two skis, a pair of scissors and some people.", ["skis", "scissors", "person"]),
    ],
)  # fmt: skip
def test_object_words_and_special_cases(caption, classes):
    assert mentions(caption) == classes


GT = chair.GroundTruth(
    {
        1: frozenset({"dog", "person", "bench"}),
        2: frozenset({"hot dog", "dining table", "cup"}),
        3: frozenset({"toilet", "sink", "toothbrush"}),
    },
    {"kind": "test", "path": "test"},
)
CAPTIONS = [
    (1, "A man sits on a bench with his dog. Another dog and a cat are nearby."),
    (2, "Two hot dogs on a table next to a cup and a knife."),
    (3, "The toilet seat is up and the sink is clean."),
]


def test_metrics_on_hand_written_captions():
    scores = chair.score_captions(CAPTIONS, GT)
    assert scores[0].hallucinated == [("cat", "cat")]
    assert scores[1].hallucinated == [("knife", "knife")]
    assert scores[2].hallucinated == [] and scores[2].recalled == ["sink", "toilet"]
    assert [len(s.mentions) for s in scores] == [5, 4, 2]  # "dog" twice: mentions repeat
    m = chair.metrics(scores)
    assert m["CHAIR_s"] == pytest.approx(100 * 2 / 3)
    assert m["CHAIR_i"] == pytest.approx(100 * 2 / 11)
    assert m["Recall"] == pytest.approx(100 * 8 / 9)  # each GT object counted once
    assert m["Len"] == pytest.approx((18 + 13 + 10) / 3)  # tokens, two-word objects once


def test_unknown_images_are_an_error_not_hallucinations():
    with pytest.raises(DataError, match=r"1 image ids have no ground truth .*: 4"):
        chair.score_captions([(4, "A dog.")], GT)


def test_compare_pairs_images():
    a = chair.score_captions(CAPTIONS, GT)
    b = chair.score_captions([(i, "A dog on a bench.") for i, _ in CAPTIONS], GT)
    result = chair.compare(a, b, n_boot=300, seed=0)
    assert result["delta"]["CHAIR_s"] == pytest.approx(100 * (2 / 3 - 2 / 3))
    assert result["delta"]["CHAIR_i"] == pytest.approx(100 * (2 / 3 - 2 / 11))
    assert chair.compare(a, a, n_boot=300)["ci_delta"]["CHAIR_i"] == (0.0, 0.0)
    with pytest.raises(ValueError, match="same images"):
        chair.compare(a, a[::-1])


def test_shipped_ground_truth_covers_coco_2014():
    gt = chair.shipped_ground_truth()
    assert len(gt.objects) == 123_287
    assert set().union(*gt.objects.values()) == set(chair.vocabulary().classes)
    ids = chair.chair500_ids()
    assert len(ids) == len(set(ids)) == 500
    gt.check(ids)
    assert len(gt.source["sha256"]) == 64


def test_captions_file_keys_and_image_names(tmp_path):
    path = tmp_path / "caps.jsonl"
    rows = [
        {"image": "COCO_val2014_000000000042.jpg", "text": "A dog."},
        {"image": "7", "text": "A cat."},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert chair.load_captions(path, "image", "text") == [(42, "A dog."), (7, "A cat.")]
    with pytest.raises(DataError, match=r"caps\.jsonl:1: missing key 'caption'"):
        chair.load_captions(path, "image")


def _coco(directory, split="val"):
    directory.mkdir(exist_ok=True)
    images = [{"id": i} for i in (1, 2, 3)]
    instances = {
        "images": images,
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}],
        "annotations": [{"image_id": 1, "category_id": 18}, {"image_id": 2, "category_id": 1}],
    }
    captions = {
        "images": images,
        "annotations": [
            {"image_id": 1, "caption": "A man with two cats."},
            {"image_id": 2, "caption": "Bowls of soup on a dining table."},
        ],
    }
    (directory / f"instances_{split}2014.json").write_text(json.dumps(instances))
    (directory / f"captions_{split}2014.json").write_text(json.dumps(captions))


def test_ground_truth_from_annotations_is_built_once_and_cached(tmp_path, monkeypatch):
    _coco(tmp_path / "ann")
    gt = chair.annotation_ground_truth(tmp_path / "ann", cache=tmp_path / "cache", progress=False)
    assert gt.objects == {
        1: {"dog", "person", "cat"},  # instance dog + caption man, cats
        2: {"person", "bowl", "dining table"},
        3: set(),  # annotated image without objects: known, not an error
    }
    assert gt.source["kind"] == "annotations"
    monkeypatch.setattr(chair, "_build", lambda *a: pytest.fail("rebuilt despite the cache"))
    again = chair.annotation_ground_truth(tmp_path / "ann", cache=tmp_path / "cache")
    assert again.objects == gt.objects and again.source["sha256"] == gt.source["sha256"]
    monkeypatch.undo()
    with open(tmp_path / "ann" / "captions_val2014.json", "a") as f:
        f.write(" ")  # a changed file invalidates the cache
    rebuilt = chair.annotation_ground_truth(tmp_path / "ann", cache=tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "chair").glob("gt-*.json.gz"))) == 2
    assert rebuilt.objects == gt.objects


def test_annotation_files_must_be_complete(tmp_path):
    (tmp_path / "ann").mkdir()
    with pytest.raises(DataError, match="instances_val2014.json, captions_val2014.json"):
        chair.annotation_ground_truth(tmp_path / "ann", cache=tmp_path)


def test_score_chair_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VLSAE_GUARD_CACHE", str(tmp_path / "cache"))
    _coco(tmp_path / "ann")
    caps = tmp_path / "caps.jsonl"
    caps.write_text(
        json.dumps({"image_id": 1, "caption": "A dog and a cat on a couch."})
        + "\n"
        + json.dumps({"image_id": 2, "caption": "A person at a dining table."})
        + "\n"
    )
    out = tmp_path / "results.json"
    argv = ["score", "chair", "--captions", str(caps), "--coco-annotations", str(tmp_path / "ann")]
    assert main([*argv, "--out", str(out), "--details", str(tmp_path / "d.jsonl")]) == 0
    result = json.loads(out.read_text())
    assert result["CHAIR_s"] == pytest.approx(50.0)
    assert result["CHAIR_i"] == pytest.approx(100 * 1 / 5)
    assert result["Recall"] == pytest.approx(100 * 4 / 6)
    assert "CHAIR_s" in capsys.readouterr().out
    assert len((tmp_path / "d.jsonl").read_text().splitlines()) == 2
    assert main(["score", "chair", "--captions", str(tmp_path / "none.jsonl")]) == 2
