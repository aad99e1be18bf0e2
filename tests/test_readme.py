"""README.md as a newcomer uses it: the quickstart runs as written, the commands' flags exist,
the install lines name real extras, and every link into docs/ lands on a file and a heading.

Python blocks are tagged with an HTML comment before them: ``<!-- test: run -->`` runs here on
the tiny model (its ``MODEL``/``SAE``/``IMAGE`` lines set to local files), ``<!-- test:
server -->`` runs against a real vLLM server in tests/test_vllm_server.py.
"""

from __future__ import annotations

import re
import runpy
import shlex
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from vlsae_guard import cli
from vlsae_guard.lab import tiny
from vlsae_guard.serving.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[1]
TAGS = {"run", "server"}


def commands(snippets) -> list[list[str]]:
    """Every command line of the README's bash blocks, as argv lists (``&&`` splits)."""
    out = []
    for snippet in snippets:
        if snippet.lang != "bash":
            continue
        for line in snippet.code.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                out.append(words[:cut])
                words = words[cut + 1 :]
    return out


def flags(argv: list[str]) -> set[str]:
    return {word.split("=")[0] for word in argv if word.startswith("--")}


def test_the_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_every_python_block_is_tagged_and_compiles(readme_snippets):
    python = [s for s in readme_snippets if s.lang == "python"]
    assert python
    for snippet in python:
        assert snippet.tag in TAGS, f"README.md:{snippet.line}: tag it <!-- test: run|server -->"
        compile(snippet.code, f"README.md:{snippet.line}", "exec")


def test_the_quickstart_runs_as_written_on_the_tiny_model(
    readme_snippets, tiny_hf_dir, tiny_sae_dir, tmp_path, monkeypatch, capsys
):
    (snippet,) = [s for s in readme_snippets if s.tag == "run"]
    image = tmp_path / "photo.jpg"
    tiny.make_images(1, seed=3)[0].save(image)
    code = snippet.with_values(MODEL=tiny_hf_dir, SAE=tiny_sae_dir, IMAGE=image)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, f"README.md:{snippet.line}", "exec"), scope)

    handle, inputs = scope["handle"], scope["inputs"]
    assert handle.stats.image_tokens > 0  # the guard rewrote the image tokens
    assert not handle.attached  # and the with block removed it
    prompt = inputs["input_ids"]
    for ids in (scope["guarded"], scope["plain"]):
        assert torch.equal(ids[:, : prompt.shape[1]], prompt) and ids.shape[1] > prompt.shape[1]
    printed = capsys.readouterr().out  # the answers may hold newlines themselves
    assert re.findall(r"^guard (on|off):", printed, re.M) == ["on", "off"]


def _help(argv: list[str], monkeypatch, capsys) -> str:
    """``--help`` of ``python benchmarks/X.py`` or ``vlsae-guard CMD``, run in this process."""
    if argv[0] == "python":
        monkeypatch.setattr(sys, "argv", [argv[1], "--help"])
        run = lambda: runpy.run_path(str(ROOT / argv[1]), run_name="__main__")  # noqa: E731
    else:
        run = lambda: cli.main([argv[1], "--help"])  # noqa: E731
    with pytest.raises(SystemExit) as exit_:
        run()
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_commands_use_flags_that_exist(readme_snippets, monkeypatch, capsys):
    checked = []
    for argv in commands(readme_snippets):
        if argv[0] == "bash":
            assert (ROOT / argv[1]).is_file(), argv
        elif argv[0] == "pip":
            continue  # test_install_lines_name_extras_and_pins_that_exist
        elif argv[:2] == ["vlsae-guard", "serve"]:
            continue  # vLLM's flags pass through: test_the_serve_command_builds_a_vllm_command
        elif (argv[0] == "python" and argv[1].startswith("benchmarks/")) or argv[
            0
        ] == "vlsae-guard":
            text = _help(argv, monkeypatch, capsys)
            missing = {f for f in flags(argv) if not re.search(rf"{re.escape(f)}\b(?!-)", text)}
            assert not missing, f"{shlex.join(argv)}: not in its --help: {sorted(missing)}"
            checked.append(argv[1])
        else:
            raise AssertionError(f"a README command this test does not know: {shlex.join(argv)}")
    assert "benchmarks/pope.py" in checked


def test_the_serve_command_builds_a_vllm_command(
    readme_snippets, tiny_hf_dir, tiny_sae_dir, capsys
):
    """`vlsae-guard serve ...` as written (model and SAE made local), with --dry-run."""
    (argv,) = [a for a in commands(readme_snippets) if a[:2] == ["vlsae-guard", "serve"]]
    local = {"llava-hf/llava-1.5-7b-hf": str(tiny_hf_dir), "path/to/vlsae": str(tiny_sae_dir)}
    assert cli.main([local.get(a, a) for a in argv[1:]] + ["--dry-run"]) == 0
    *env, command = capsys.readouterr().out.splitlines()
    settings = ServeSettings.from_env(dict(shlex.split(line)[0].split("=", 1) for line in env))
    assert settings.sae == str(tiny_sae_dir)
    assert settings.guard.alpha == float(argv[argv.index("--vlsae-alpha") + 1])
    vllm_args = argv[argv.index("--vlsae-alpha") + 2 :]  # everything after the guard flags
    assert shlex.join(vllm_args) in command and "--trust-request-mm-kwargs" in command


def test_install_lines_name_extras_and_pins_that_exist(readme_snippets):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = set(project["optional-dependencies"])
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    named = set()
    for argv in commands(readme_snippets):
        if argv[:2] != ["pip", "install"]:
            continue
        for word in argv[2:]:
            if match := re.fullmatch(r"\.\[(\w+)\]", word):
                named.add(match[1])
            elif not word.startswith("-") and word != ".":
                assert word in setup, f"README installs {word}; scripts/setup.sh does not"
    assert named and named <= extras, f"README names extras {named}, pyproject has {extras}"
    assert {"vllm", "llava"} <= named


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCED = re.compile(r"^```.*?^```$", re.S | re.M)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", _FENCED.sub("", path.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize(
    "page", ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("docs/*.md"))]
)
def test_links_land_on_a_file_and_a_heading(page):
    source = ROOT / page
    links = _LINK.findall(_FENCED.sub("", source.read_text()))
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        target, _, anchor = link.partition("#")
        path = (source.parent / target).resolve() if target else source
        assert path.exists(), f"{page}: {link} -> no {path}"
        if anchor:
            assert anchor in _anchors(path), f"{page}: {link} -> no heading #{anchor}"


def test_the_docs_pages_are_all_in_the_readme_table():
    readme = (ROOT / "README.md").read_text()
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages and {p for p in pages if f"(docs/{p})" not in readme} == set()
