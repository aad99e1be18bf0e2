"""The console script: in-process through ``main(argv)``, and once as a real process.

Failures must be one clear message on stderr with exit status 2 and no traceback; successes
print to stdout only.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pickle_attack import Payload
from torch import nn

from vlsae_guard import SAEConfig, __version__
from vlsae_guard.cli import main
from vlsae_guard.core.checkpoint import load

D, N, K = 16, 40, 4
D_VISION, D_TEXT = 12, 20


def linears(**shapes: tuple[int, int]) -> dict[str, torch.Tensor]:
    """State-dict entries of nn.Linear(in, out) modules, named like the official code."""
    return {
        f"{name}.{key}": value
        for name, (d_in, d_out) in shapes.items()
        for key, value in nn.Linear(d_in, d_out).state_dict().items()
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The paper's file layouts (VL-SAE .pth, auxiliary .pt), a payload and a plain file."""
    root = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    sae = {"encoder": nn.Parameter(torch.randn(N, D))}
    sae |= linears(vision_decoder=(N, D), text_decoder=(N, D))
    aux = linears(
        vision_projection=(D_VISION, D),
        text_projection=(D_TEXT, D),
        vision_decoder=(D, D_VISION),
        text_decoder=(D, D_TEXT),
    )
    paths = {name: root / name for name in ("sae.pth", "aux.pt", "evil.pth", "notes.txt")}
    torch.save(sae, paths["sae.pth"])
    torch.save(aux, paths["aux.pt"])
    torch.save({"encoder": Payload(root / "pwned")}, paths["evil.pth"])
    paths["notes.txt"].write_text("not a directory")
    return paths | {"pwned": root / "pwned", "root": root}


@pytest.fixture(scope="module")
def checkpoint(files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "vlsae"
    argv = ["import-official", "--sae", str(files["sae.pth"]), "--out", str(out)]
    assert main([*argv, "--topk", str(K)]) == 0
    return out


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_import_official_prints_a_summary(files, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run(
        capsys,
        "import-official", "--sae", str(files["sae.pth"]), "--aux", str(files["aux.pt"]),
        "--out", str(out), "--topk", "5", "--model-id", "llava-hf/llava-1.5-7b-hf",
        "--site", "layer", "--layer", "3",
    )  # fmt: skip
    assert (code, stderr) == (0, "")
    lines = dict(line.split(None, 1) for line in stdout.splitlines())
    assert lines == {
        "architecture": "vl-sae",
        "d_in": str(D),
        "n_concepts": str(N),
        "k": "5",
        "aux": f"vision {D_VISION} / text {D_TEXT} -> {D}",
        "source": "llava-hf/llava-1.5-7b-hf, layer 3",
        "out": str(out.resolve()),
    }
    config = load(out).config
    assert (config.k, config.source.layer, config.aux.d_text) == (5, 3, D_TEXT)


def test_import_official_defaults(checkpoint):
    config = load(checkpoint).config
    assert config.aux is None and config.source.model_id is None and config.source.site is None


def test_layer_implies_site_layer(files, tmp_path):
    argv = ["import-official", "--sae", str(files["sae.pth"]), "--out", str(tmp_path)]
    assert main([*argv, "--topk", str(K), "--layer", "7"]) == 0
    assert load(tmp_path).config.source.model_dump(include={"site", "layer"}) == {
        "site": "layer",
        "layer": 7,
    }


def test_point_records_where_in_the_layer(files, tmp_path, capsys):
    argv = ["import-official", "--sae", str(files["sae.pth"]), "--out", str(tmp_path)]
    code, stdout, _ = run(capsys, *argv, "--topk", str(K), "--layer", "30", "--point", "input")
    assert code == 0 and "model not recorded, layer 30 (input)" in stdout
    source = load(tmp_path).config.source
    assert (source.site, source.layer, source.point, source.place) == (
        "layer", 30, "input", "layer:30"
    )  # fmt: skip


@pytest.mark.parametrize("check", [[], ["--check"]], ids=["config", "check"])
def test_info_prints_the_config_as_json(checkpoint, capsys, check):
    code, stdout, stderr = run(capsys, "info", str(checkpoint), *check)
    assert (code, stderr) == (0, "")
    assert SAEConfig.model_validate_json(stdout) == load(checkpoint).config


def _corrupt_copy(checkpoint: Path, tmp_path: Path) -> Path:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    return broken


# argv templates, filled with the fixture paths, and what stderr must say.
ERRORS = {
    "info-missing": ("info {root}/nope", "no such directory"),
    "info-corrupt": ("info {broken} --check", "unreadable or truncated"),
    "topk-zero": ("import-official --sae {sae} --out {out} --topk 0", "--topk: Input should be"),
    "topk-too-big": (
        "import-official --sae {sae} --out {out} --topk 41",
        "k must be <= n_concepts",
    ),
    "sae-missing": ("import-official --sae {root}/x.pth --out {out}", "--sae: Path does not point"),
    "aux-missing": (
        "import-official --sae {sae} --aux {root}/x.pt --out {out} --topk 4",
        "--aux: Path does not point",
    ),
    "layer-needed": (
        "import-official --sae {sae} --out {out} --topk 4 --site layer",
        "--site/--layer/--point: Value error, site 'layer' needs a layer index",
    ),
    "point-without-layer": (
        "import-official --sae {sae} --out {out} --topk 4 --point input",
        "--site/--layer/--point: Value error, point applies to site 'layer' only",
    ),
    "layer-negative": (
        "import-official --sae {sae} --out {out} --topk 4 --site layer --layer -1",
        "--layer: Input should be greater than or equal to 0",
    ),
    "out-is-a-file": (
        "import-official --sae {sae} --out {notes} --topk 4",
        "--out: Value error, exists and is not a directory",
    ),
    "pickled-code": (
        "import-official --sae {evil} --out {out} --topk 4",
        "cannot be read as a tensors-only torch checkpoint",
    ),
    "not-an-official-file": ("import-official --sae {notes} --out {out}", "notes.txt"),
}


@pytest.mark.parametrize(("template", "fragment"), ERRORS.values(), ids=ERRORS)
def test_errors_exit_2_with_a_message(files, checkpoint, tmp_path, capsys, template, fragment):
    paths = {
        "root": files["root"],
        "sae": files["sae.pth"],
        "evil": files["evil.pth"],
        "notes": files["notes.txt"],
        "out": tmp_path / "out",
        "broken": _corrupt_copy(checkpoint, tmp_path),
    }
    argv = template.format(**paths).split()
    code, stdout, stderr = run(capsys, *argv)
    assert (code, stdout) == (2, "")
    assert stderr.startswith(f"vlsae-guard {argv[0]}: error: ")
    assert fragment in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()
    assert not files["pwned"].exists()


@pytest.mark.parametrize(
    ("argv", "code", "fragment"),
    [
        ([], 2, "required: COMMAND"),
        (["bogus"], 2, "invalid choice: 'bogus'"),
        (["import-official", "--out", "x"], 2, "required: --sae"),
        (["import-official", "--sae", "x", "--out", "y", "--site", "head"], 2, "invalid choice"),
        (["import-official", "--sae", "x", "--out", "y", "--topk", "two"], 2, "invalid int"),
        (["--version"], 0, __version__),
        (["info", "--help"], 0, "usage: vlsae-guard info"),
    ],
)
def test_argparse_outcomes_are_return_codes(capsys, argv, code, fragment):
    got, stdout, stderr = run(capsys, *argv)
    assert got == code
    assert fragment in (stderr if code else stdout)


def test_runs_as_a_module(checkpoint):
    """A real process: the exit status reaches the shell and stderr holds one line."""
    proc = subprocess.run(
        [sys.executable, "-m", "vlsae_guard.cli", "info", str(checkpoint / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.count("\n") == 1 and "no such directory" in proc.stderr
