"""Pair sources: COCO, JSONL and HF-datasets (through a stand-in with the same interface)."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image
from pydantic import TypeAdapter, ValidationError

from vlsae_guard.lab import tiny
from vlsae_guard.pipeline.pairs import (
    DataConfig,
    ImageError,
    SourceError,
    coco_pairs,
    hf_pairs,
    jsonl_pairs,
    open_source,
)


class StandInDataset:
    """The part of ``datasets.Dataset`` the HF source uses: rows, columns, fingerprint.

    ``datasets`` (with pyarrow) is not in the test requirements; this mimics its interface:
    ``ds[i]`` is a row dict (images decoded), ``ds["col"]`` a whole column as a list.
    """

    def __init__(self, rows: list[dict], fingerprint: str = "abc"):
        self.rows = rows
        self.column_names = list(rows[0])
        self._fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        if isinstance(key, str):
            return [row[key] for row in self.rows]
        return self.rows[key]


@pytest.fixture
def image_dir(tmp_path):
    for i, img in enumerate(tiny.make_images(3, seed=0)):
        img.save(tmp_path / f"{i}.png")
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    buf = io.BytesIO()
    tiny.make_images(1)[0].save(buf, format="PNG")
    (tmp_path / "truncated.png").write_bytes(buf.getvalue()[:60])
    Image.new("L", (8, 8), 128).save(tmp_path / "gray.png")
    return tmp_path


def coco_file(path, images, annotations):
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def test_coco_one_pair_per_caption_or_per_image(tmp_path, image_dir):
    file = coco_file(
        tmp_path / "captions.json",
        [{"id": 7, "file_name": "0.png"}, {"id": 9, "file_name": "1.png"}],
        [
            {"id": 100, "image_id": 7, "caption": " A red circle. "},
            {"id": 101, "image_id": 7, "caption": "Something round."},
            {"id": 102, "image_id": 9, "caption": "A square."},
        ],
    )
    pairs = coco_pairs(file, image_dir)
    assert [p.id for p in pairs] == ["coco:100", "coco:101", "coco:102"]
    assert pairs[0].caption == "A red circle." and pairs[0].image == str(image_dir / "0.png")
    assert [p.id for p in coco_pairs(file, image_dir, captions="first")] == [
        "coco:100",
        "coco:102",
    ]
    assert pairs.load_image(pairs[2]).size == (40, 32)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"images": []}, "expected a COCO captions file"),
        (
            {"images": [{"id": 1}], "annotations": []},
            "images[0].file_name: expected str, found nothing",
        ),
        (
            {
                "images": [{"id": 1, "file_name": "a"}],
                "annotations": [{"image_id": 1, "caption": 3}],
            },
            "annotations[0].caption: expected str, found int 3",
        ),
        (
            {"images": [], "annotations": [{"image_id": 5, "caption": "x"}]},
            "annotations[0].image_id 5 is not in 'images'",
        ),
    ],
)
def test_coco_errors_name_file_and_field(tmp_path, content, message):
    file = tmp_path / "bad.json"
    file.write_text(json.dumps(content))
    with pytest.raises(SourceError) as e:
        coco_pairs(file, tmp_path)
    assert str(file) in str(e.value) and message in str(e.value)


def test_jsonl_paths_ids_and_errors(tmp_path, image_dir):
    file = tmp_path / "pairs.jsonl"
    file.write_text(
        json.dumps({"image": "0.png", "caption": "first"})
        + "\n\n"
        + json.dumps({"image": "1.png", "caption": "second", "id": 42})
        + "\n"
    )
    pairs = jsonl_pairs(file, image_root=image_dir)
    assert [(p.id, p.image) for p in pairs] == [
        ("line:1", str(image_dir / "0.png")),
        ("42", str(image_dir / "1.png")),
    ]
    assert jsonl_pairs(file).pairs[0].image == str(tmp_path / "0.png")  # relative to the file
    file.write_text('{"image": "0.png", "caption": "ok"}\n{"image": "0.png"\n')
    with pytest.raises(SourceError, match=r"pairs\.jsonl:2: not valid JSON"):
        jsonl_pairs(file)
    file.write_text('{"image": "0.png", "text": "wrong key"}\n')
    with pytest.raises(SourceError, match=r"line 1\.caption: expected str, found nothing"):
        jsonl_pairs(file)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("nothing-here.png", "missing"),
        ("garbage.png", "unreadable"),
        ("truncated.png", "unreadable"),
    ],
)
def test_bad_images_raise_image_error_with_reason(tmp_path, image_dir, name, reason):
    file = tmp_path / "p.jsonl"
    file.write_text(json.dumps({"image": name, "caption": "c"}) + "\n")
    source = jsonl_pairs(file, image_dir)
    with pytest.raises(ImageError) as e:
        source.load_image(source[0])
    assert e.value.reason == reason


def test_images_become_rgb(tmp_path, image_dir):
    file = tmp_path / "p.jsonl"
    file.write_text(json.dumps({"image": "gray.png", "caption": "c"}) + "\n")
    source = jsonl_pairs(file, image_dir)
    assert source.load_image(source[0]).mode == "RGB"


def test_hf_source_rows_columns_and_image_kinds(image_dir):
    png = io.BytesIO()
    tiny.make_images(1)[0].save(png, format="PNG")
    ds = StandInDataset(
        [
            {"img": tiny.make_images(1)[0], "text": "a decoded image"},
            {"img": {"bytes": png.getvalue(), "path": None}, "text": ["two", "captions"]},
            {"img": str(image_dir / "1.png"), "text": "a path"},
            {"img": None, "text": "no image"},
        ]
    )
    source = hf_pairs(ds, image_column="img", text_column="text")
    assert [p.id for p in source] == ["hf:0", "hf:1:0", "hf:1:1", "hf:2", "hf:3"]
    assert [p.caption for p in source][1:3] == ["two", "captions"]
    for pair in source.pairs[:4]:
        assert source.load_image(pair).mode == "RGB"
    with pytest.raises(ImageError) as e:
        source.load_image(source[4])
    assert e.value.reason == "missing"
    with pytest.raises(SourceError, match=r"no column\(s\) \['caption'\]"):
        hf_pairs(ds, image_column="img")


def test_open_source_from_config_and_validation(tmp_path, image_dir):
    file = tmp_path / "p.jsonl"
    file.write_text(json.dumps({"image": "0.png", "caption": "c"}) + "\n")
    adapter = TypeAdapter(DataConfig)
    config = adapter.validate_python({"format": "jsonl", "path": str(file)})
    assert len(open_source(config)) == 1
    ds = StandInDataset([{"image": None, "caption": "x"}])
    hf = adapter.validate_python({"format": "hf", "dataset": "any/name"})
    assert open_source(hf, dataset=ds)[0].id == "hf:0"
    with pytest.raises(ValidationError, match="format"):
        adapter.validate_python({"format": "csv", "path": str(file)})
    with pytest.raises(ValidationError, match="path"):
        adapter.validate_python({"format": "jsonl", "path": str(tmp_path / "none.jsonl")})


def test_fingerprint_changes_with_content_and_limit(tmp_path):
    file = tmp_path / "p.jsonl"
    rows = [{"image": f"{i}.png", "caption": f"caption {i}"} for i in range(3)]
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = jsonl_pairs(file), jsonl_pairs(file)
    assert a.fingerprint() == b.fingerprint()
    assert a.head(2).fingerprint() != a.fingerprint() and len(a.head(2)) == 2
    rows[1]["caption"] = "changed"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert jsonl_pairs(file).fingerprint() != a.fingerprint()
