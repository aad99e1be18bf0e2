"""catalog: top-N images and captions per concept, labels, JSON schema, HTML (parsed and in a
real headless browser when one is installed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from _concepts_support import concepts_env  # noqa: F401

from vlsae_guard.cli import main
from vlsae_guard.concepts import ConceptsError
from vlsae_guard.concepts.catalog import (
    STOPWORDS,
    TopN,
    build_catalog,
    label_words,
    read_catalog,
    words,
    write_catalog,
)
from vlsae_guard.core.checkpoint import load
from vlsae_guard.pipeline.store import ActivationStore

TOP_N = 3


def brute_force(store: ActivationStore, sae, modality: str) -> dict[int, torch.Tensor]:
    """Pair index -> dense pooled (mean) activations, straight from the shard tensors."""
    out = {}
    for p in range(len(store.shards)):
        t = store.load(p, (modality, f"{modality}_pair"))
        for pair in t[f"{modality}_pair"].unique().tolist():
            rows = t[modality][t[f"{modality}_pair"] == pair]
            out[pair] = sae.encode(rows, modality).mean(0).detach()
    return out


@pytest.fixture(scope="module")
def built(concepts_env, tmp_path_factory):  # noqa: F811
    store = ActivationStore(concepts_env.store)
    sae = load(concepts_env.sae)
    catalog = build_catalog(store, sae, top_n=TOP_N, label_docs=TOP_N)
    out = tmp_path_factory.mktemp("catalog")
    write_catalog(catalog, out)
    return store, sae, catalog, out


def test_top_images_and_captions_are_the_highest(built, concepts_env):  # noqa: F811
    store, sae, catalog, _ = built
    vision = brute_force(store, sae, "vision")
    text = brute_force(store, sae, "text")
    duplicate = 10  # pair 10 is a second caption of image 0: not a separate image
    assert catalog.images == concepts_env.n_images and catalog.captions == 11
    del vision[duplicate]
    firing = {c for acts in (vision, text) for a in acts.values() for c in a.nonzero().flatten()}
    assert {c.concept for c in catalog.concepts} == {int(c) for c in firing}
    for concept in catalog.concepts:
        k = concept.concept
        for items, acts in ((concept.images, vision), (concept.captions, text)):
            values = torch.tensor([float(a[k]) for a in acts.values()])
            want = values[values > 0].sort(descending=True).values[:TOP_N]
            got = torch.tensor([i.activation for i in items])
            # float32, and 2 - sqrt(2 - 2 cos) amplifies rounding near cos = 1 (the encoder rows
            # are store rows here): batched and per-pair encodings agree to ~1e-5.
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
            for item in items:  # each listed item really has that activation
                assert float(acts[item.pair][k]) == pytest.approx(item.activation, rel=1e-4)
        assert concept.image_count == sum(float(a[k]) > 0 for a in vision.values())
        assert concept.caption_count == sum(float(a[k]) > 0 for a in text.values())
        assert concept.shared == (k % 2 == 0)
        assert all(i.pair != duplicate for i in concept.images)


def test_labels_are_characteristic_caption_words(built):
    _, _, catalog, _ = built
    labelled = 0
    for concept in catalog.concepts:
        docs = " ".join(i.caption for i in concept.images + concept.captions)
        assert set(concept.words) <= set(words(docs))
        assert not set(concept.words) & STOPWORDS
        assert concept.label == (", ".join(concept.words) or "(no label)")
        labelled += bool(concept.words)
    assert labelled >= 1  # a random SAE: most concepts have nothing characteristic

    assert words("A dog and THE Frisbee, it's on a lawn") == ["dog", "frisbee", "lawn"]
    df = Counter({"red": 1, "circle": 5, "square": 5})
    assert label_words(["a red circle", "red square"], df, 10, top=2)[0] == "red"
    assert label_words(["the a of"], df, 10) == []


def test_label_words_must_beat_their_base_rate_by_more_than_chance():
    df = Counter({"see": 20, "ring": 25, "kite": 10})  # in 100 captions; "see": a template
    at_base_rate = ["I can see a ring"] * 7 + ["a ring"] * 25  # see: 22% of 32, chance level
    assert label_words(at_base_rate, df, 100) == ["ring"]
    enriched = ["I can see a ring"] * 16 + ["a ring"] * 16  # see: 50%, 3.6 sd above 20%
    assert label_words(enriched, df, 100) == ["ring", "see"]


def test_labels_read_label_docs_items_however_many_are_shown(built):
    store, sae, catalog, _ = built
    one = build_catalog(store, sae, top_n=1, label_docs=TOP_N)
    assert [c.label for c in one.concepts] == [c.label for c in catalog.concepts]
    assert all(len(c.images) <= 1 and len(c.captions) <= 1 for c in one.concepts)
    assert any(len(c.images) > 1 for c in catalog.concepts)  # so the labels had more to read


def test_topn_keeps_the_n_largest_per_concept():
    g = torch.Generator().manual_seed(0)
    top = TopN(4)
    concepts, values = torch.randint(0, 7, (500,), generator=g), torch.rand(500, generator=g)
    for part in torch.arange(500).split(37):
        top.update(concepts[part], values[part], part)
    groups = top.groups()
    for c in range(7):
        want = values[concepts == c].sort(descending=True).values[:4].tolist()
        assert [v for _, v in groups[c]] == pytest.approx(want)
        assert all(concepts[i] == c and values[i] == pytest.approx(v) for i, v in groups[c])


def test_json_schema_round_trip(built, tmp_path):
    _, _, catalog, out = built
    raw = json.loads((out / "catalog.json").read_text())
    assert raw["format"] == "vlsae-guard/catalog" and raw["version"] == 1
    assert set(raw) == {
        "format", "version", "sae", "store", "pooling", "top_n", "n_concepts", "images",
        "captions", "concepts",
    }  # fmt: skip
    first = raw["concepts"][0]
    assert set(first) == {
        "concept", "label", "words", "shared", "image_count", "caption_count", "images",
        "captions",
    }  # fmt: skip
    assert set(first["images"][0]) == {
        "pair", "id", "activation", "caption", "image", "thumbnail",
    }  # fmt: skip
    assert read_catalog(out / "catalog.json") == catalog
    raw["concepts"][0]["shared"] = "maybe"
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(ConceptsError, match=r"bad.json: not a concept catalog\n.*shared"):
        read_catalog(tmp_path / "bad.json")


class PageParser(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.imgs, self.ids, self.tags = [], [], [], set(), Counter()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags[tag] += 1
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.imgs.append(a)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
        else:
            self.stack.pop()


def test_html_is_well_formed_and_complete(built, concepts_env):  # noqa: F811
    _, _, catalog, out = built
    page = (out / "index.html").read_text()
    parser = PageParser()
    parser.feed(page)
    parser.close()
    assert parser.errors == [] and parser.stack == []
    assert {f"concept-{c.concept}" for c in catalog.concepts} <= parser.ids
    assert parser.tags["section"] == len(catalog.concepts)
    assert parser.imgs and parser.tags["b"] == 0  # the caption's <b> is escaped, not markup
    for img in parser.imgs:
        src = img["src"]
        assert src.startswith("data:") or (out / src).is_file(), src
    n_thumbs = sum(1 for c in catalog.concepts for i in c.images if i.thumbnail)
    assert len(parser.imgs) == n_thumbs == sum(len(c.images) for c in catalog.concepts)
    assert "&lt;b&gt;same&lt;/b&gt; picture &amp; more" in page or not any(
        "same" in i.caption for c in catalog.concepts for i in c.captions
    )


def browser() -> str | None:
    for name in (os.environ.get("VLSAE_BROWSER"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


CHECK = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images].map(i => [i.getAttribute("src"), i.complete, i.naturalWidth]);
  const labels = [...document.querySelectorAll(".label")].map(l => {
    const s = getComputedStyle(l);
    return [l.textContent, l.getBoundingClientRect().height, s.visibility, s.display];
  });
  const pre = document.createElement("pre");
  pre.id = "render-check";
  pre.textContent = JSON.stringify({imgs, labels});
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.skipif(
    browser() is None,
    reason="no headless browser (chromium) on PATH: `apt-get install chromium` or set "
    "VLSAE_BROWSER",
)
def test_page_renders_in_headless_browser(built):
    """Chromium loads the page from disk: every thumbnail decodes, every label is visible."""
    _, _, catalog, out = built
    check = out / "render-check.html"
    check.write_text((out / "index.html").read_text().replace("</body>", CHECK + "</body>"))
    done = subprocess.run(
        [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
         "--virtual-time-budget=5000", "--dump-dom", check.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    dom = done.stdout
    start = dom.find('<pre id="render-check">')
    assert start >= 0, f"no render result; stderr:\n{done.stderr[-2000:]}"
    import html

    body = dom[start + len('<pre id="render-check">') : dom.find("</pre>", start)]
    result = json.loads(html.unescape(body))
    assert len(result["imgs"]) == sum(len(c.images) for c in catalog.concepts)
    assert all(complete and width > 0 for _, complete, width in result["imgs"]), result["imgs"]
    assert [text for text, *_ in result["labels"]] == [c.label for c in catalog.concepts]
    assert all(
        h > 0 and vis == "visible" and disp != "none" for _, h, vis, disp in result["labels"]
    )


def test_catalog_cli(concepts_env, tmp_path, capsys):  # noqa: F811
    env = concepts_env
    argv = ["catalog", "--sae", str(env.sae), "--store", str(env.store)]
    assert main([*argv, "--out", str(tmp_path / "c"), "--concepts", "1", "4", "--top-n", "2"]) == 0
    printed = capsys.readouterr().out
    assert "2 concepts of 48" in printed and "index.html" in printed
    catalog = read_catalog(tmp_path / "c" / "catalog.json")
    assert [c.concept for c in catalog.concepts] == [1, 4]
    assert all(len(c.images) <= 2 for c in catalog.concepts)
    assert Path(tmp_path / "c" / "thumbs").is_dir()
    assert main([*argv, "--out", str(tmp_path / "d"), "--concepts", "99"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main([*argv[:-1], str(tmp_path / "nowhere"), "--out", str(tmp_path / "e")]) == 2
    assert "--store" in capsys.readouterr().err
