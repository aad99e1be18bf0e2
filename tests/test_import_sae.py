"""dictionary_learning imports: BatchTopK and Matryoshka ``ae.pt`` files become checkpoints that
compute what dictionary_learning computes, and a malformed file is refused, naming the file and
the tensor, before anything is written.

The state dicts are written exactly as dictionary_learning's modules save them; the reference is
its formulas in float64 on the raw tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pickle_attack import Payload

from vlsae_guard import CheckpointError, SAEConfig
from vlsae_guard.cli import main
from vlsae_guard.core.checkpoint import load
from vlsae_guard.core.dictionary_learning import import_dictionary_learning
from vlsae_guard.core.sae import BatchTopKSAE, MatryoshkaSAE
from vlsae_guard.outputs import OutputError

D, N, K = 16, 64, 8
GROUPS = [4, 8, 16, 36]  # F/16, F/8, F/4, 9F/16, as dictionary_learning's default fractions
# Not a round number, so a rounding anywhere on the way would show; cuts about half the
# positive activations of the inputs below.
THRESHOLD = 2.3456789


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def batchtopk_state() -> dict[str, torch.Tensor]:
    """``BatchTopKSAE.state_dict()``: nn.Linear encoder, bias-free nn.Linear(F -> D) decoder."""
    return {
        "encoder.weight": randn(N, D, seed=1),
        "encoder.bias": randn(N, seed=2),
        "decoder.weight": randn(D, N, seed=3),
        "b_dec": randn(D, seed=4),
        "k": torch.tensor(K, dtype=torch.int),
        "threshold": torch.tensor(THRESHOLD, dtype=torch.float32),
    }


def matryoshka_state() -> dict[str, torch.Tensor]:
    """``MatryoshkaBatchTopKSAE.state_dict()``: bare parameters W_enc (D x F), W_dec (F x D)."""
    return {
        "W_enc": randn(D, N, seed=5),
        "b_enc": randn(N, seed=6),
        "W_dec": randn(N, D, seed=7),
        "b_dec": randn(D, seed=8),
        "k": torch.tensor(K, dtype=torch.int),
        "threshold": torch.tensor(THRESHOLD, dtype=torch.float32),
        "group_sizes": torch.tensor(GROUPS),
    }


STATES = {"batchtopk": batchtopk_state, "matryoshka": matryoshka_state}
CLASSES = {"batchtopk": BatchTopKSAE, "matryoshka": MatryoshkaSAE}


def reference(state: dict[str, torch.Tensor], x: torch.Tensor):
    """dictionary_learning's encode (threshold rule) and decode, in float64: (pre-threshold
    activations, codes, reconstruction)."""
    s = {k: v.double() for k, v in state.items()}
    x = x.double()
    if "W_enc" in s:
        acts = F.relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])
        decode = lambda z: z @ s["W_dec"] + s["b_dec"]  # noqa: E731
    else:
        acts = F.relu(F.linear(x - s["b_dec"], s["encoder.weight"], s["encoder.bias"]))
        decode = lambda z: F.linear(z, s["decoder.weight"]) + s["b_dec"]  # noqa: E731
    z = acts * (acts > s["threshold"])
    return acts, z, decode(z)


def write(tmp_path: Path, state, name: str = "ae.pt") -> Path:
    file = tmp_path / "run" / name
    file.parent.mkdir(exist_ok=True)
    torch.save(state, file)
    return file


@pytest.mark.parametrize("architecture", STATES)
def test_import_matches_dictionary_learning(tmp_path, architecture):
    state = STATES[architecture]()
    sae = import_dictionary_learning(write(tmp_path, state), tmp_path / "out")
    reloaded = load(tmp_path / "out")
    x = randn(32, D, seed=9)
    acts, z, recon = reference(state, x)
    positive = acts > 0
    # The threshold must cut some positive activations and keep others, far from the boundary.
    assert 0 < int((z > 0).sum()) < int(positive.sum())
    assert (acts - THRESHOLD).abs().min() > 1e-4
    for model in (sae, reloaded):
        assert type(model) is CLASSES[architecture]
        config = model.config
        assert (config.architecture, config.d_in, config.n_concepts, config.k) == (
            architecture, D, N, K
        )  # fmt: skip
        assert config.groups == (GROUPS if architecture == "matryoshka" else None)
        assert model.threshold.dtype == torch.float32
        assert model.threshold.item() == state["threshold"].item()  # bit for bit
        dense = model.encode(x)
        assert torch.equal(dense > 0, z > 0)  # the same active set
        torch.testing.assert_close(dense.double(), z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_topk(x).dense(), dense, rtol=0, atol=0)
        for decoded in (model(x), model.decode(model.encode_topk(x)), model.decode(z.float())):
            torch.testing.assert_close(decoded.double(), recon, rtol=1e-5, atol=1e-4)


WRAPPERS = {
    "state_dict-key": lambda s: {"state_dict": s},
    "data-parallel": lambda s: {f"module.{k}": v for k, v in s.items()},
}


@pytest.mark.parametrize("wrap", WRAPPERS.values(), ids=WRAPPERS)
def test_common_wrappings_are_accepted(tmp_path, wrap):
    state = matryoshka_state()
    sae = import_dictionary_learning(write(tmp_path, wrap(state)), tmp_path / "out")
    torch.testing.assert_close(sae.encoder.weight, state["W_enc"].T, rtol=0, atol=0)
    assert sae.config.groups == GROUPS


def trainer_config(dict_class: str = "MatryoshkaBatchTopKSAE", **extra) -> str:
    """The config.json dictionary_learning writes beside ae.pt."""
    trainer = {"dict_class": dict_class, "k": K, "layer": 3, "lm_name": "org/model", **extra}
    return json.dumps({"trainer": trainer, "buffer": {"d_submodule": D}})


@pytest.mark.parametrize(
    ("config_json", "source", "model_id"),
    [
        (trainer_config(), None, "org/model"),
        (trainer_config(), {"model_id": "given/model"}, "given/model"),
        (trainer_config("BatchTopKSAE"), None, None),  # describes another class
        ("{not json", None, None),
        (json.dumps([1, 2]), None, None),
        (None, None, None),
    ],
    ids=["lm_name", "given-wins", "other-class", "invalid-json", "not-a-mapping", "absent"],
)
def test_config_json_gives_the_model_id_only(tmp_path, config_json, source, model_id):
    ckpt = write(tmp_path, matryoshka_state())
    if config_json is not None:
        (ckpt.parent / "config.json").write_text(config_json)
    sae = import_dictionary_learning(ckpt, tmp_path / "out", source=source)
    assert sae.config.source.model_id == model_id
    assert sae.config.source.site is None and sae.config.source.layer is None  # never guessed
    assert load(tmp_path / "out").config == sae.config


def _set(name: str, value):
    return lambda s: s | {name: value}


def _drop(name: str):
    return lambda s: {k: v for k, v in s.items() if k != name}


def _poison(name: str):
    def edit(s):
        s[name] = s[name].clone()
        s[name].view(-1)[3] = float("nan")
        return s

    return edit


# (layout, edit, fragments of the message besides the file name)
ERRORS = {
    "unknown-keys": (
        "batchtopk",
        _drop("b_dec"),
        ["unknown state-dict layout", "found keys ['decoder.weight', 'encoder.bias'",
         "BatchTopKSAE: ['b_dec', 'decoder.weight'", "MatryoshkaBatchTopKSAE: ['W_dec', 'W_enc'"],
    ),
    "mixed-keys": ("batchtopk", _set("group_sizes", torch.tensor(GROUPS)), ["unknown state-dict"]),
    "groups-sum": (
        "matryoshka",
        _set("group_sizes", torch.tensor([4, 8, 16, 35])),
        ["tensor group_sizes: expected positive sizes summing to F (n_concepts, 64), found "
         "[4, 8, 16, 35] (sum 63)"],
    ),
    "groups-zero": (
        "matryoshka", _set("group_sizes", torch.tensor([0, 12, 16, 36])), ["found [0, 12, 16, 36]"]
    ),
    "groups-empty": (
        "matryoshka", _set("group_sizes", torch.tensor([], dtype=torch.long)), ["found [] (sum 0)"]
    ),
    "groups-float": (
        "matryoshka",
        _set("group_sizes", torch.tensor([4.0, 8.0, 16.0, 36.0])),
        ["tensor group_sizes: expected a 1-d integer tensor, found torch.float32 of shape (4,)"],
    ),
    "k-zero": (
        "batchtopk", _set("k", torch.tensor(0)), ["tensor k: expected 1 <= k <= F", "found 0"]
    ),
    "k-negative": ("matryoshka", _set("k", torch.tensor(-3)), ["tensor k: expected", "found -3"]),
    "k-too-big": ("batchtopk", _set("k", torch.tensor(N + 1)), ["(n_concepts, 64), found 65"]),
    "k-float": ("batchtopk", _set("k", torch.tensor(8.0)), ["tensor k: expected a 0-d integer"]),
    "k-vector": ("batchtopk", _set("k", torch.tensor([K])), ["found torch.int64 of shape (1,)"]),
    "shape-mismatch": (
        "matryoshka",
        _set("W_dec", randn(N, D - 1, seed=0)),
        ["inconsistent MatryoshkaBatchTopKSAE (D=16, F=64, read from W_enc)",
         "tensor W_dec: expected shape (64, 16), found (64, 15)"],
    ),
    "decoder-not-transposed": (
        "batchtopk",
        _set("decoder.weight", randn(N, D, seed=0)),
        ["tensor decoder.weight: expected shape (16, 64), found (64, 16)"],
    ),
    "vector-encoder": (
        "matryoshka", _set("W_enc", randn(N, seed=0)), ["tensor W_enc should be a non-empty matrix"]
    ),
    "nan": ("matryoshka", _poison("b_enc"), ["tensor b_enc: 1 NaN/inf values"]),
    "nan-weight": ("batchtopk", _poison("encoder.weight"), ["tensor encoder.weight: 1 NaN/inf"]),
    "inf-threshold": (
        "batchtopk", _set("threshold", torch.tensor(float("inf"))), ["tensor threshold: 1 NaN/inf"]
    ),
    "threshold-vector": (
        "matryoshka",
        _set("threshold", torch.tensor([THRESHOLD])),
        ["tensor threshold: expected shape (), found (1,)"],
    ),
    "threshold-integer": (
        "batchtopk", _set("threshold", torch.tensor(2)), ["threshold: expected a floating-point"]
    ),
    "not-a-dict": ("batchtopk", lambda s: [s["b_dec"]], ["expected a state dict of tensors"]),
}  # fmt: skip


@pytest.mark.parametrize(("layout", "edit", "fragments"), ERRORS.values(), ids=ERRORS)
def test_bad_files_are_refused_before_writing(tmp_path, layout, edit, fragments):
    ckpt = write(tmp_path, edit(STATES[layout]()))
    with pytest.raises(CheckpointError) as info:
        import_dictionary_learning(ckpt, tmp_path / "out")
    for fragment in [str(ckpt), *fragments]:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"
    assert not (tmp_path / "out").exists()


def test_pickled_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = write(tmp_path, matryoshka_state() | {"W_enc": Payload(marker)})
    with pytest.raises(CheckpointError, match="ae.pt: cannot be read as a tensors-only"):
        import_dictionary_learning(ckpt, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_non_empty_out_needs_overwrite(tmp_path):
    ckpt = write(tmp_path, batchtopk_state())
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty; pass --overwrite"):
        import_dictionary_learning(ckpt, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    import_dictionary_learning(ckpt, out, overwrite=True)
    assert load(out).config.architecture == "batchtopk"


def test_the_directory_of_the_file_is_refused(tmp_path):
    """Even with overwrite: our config.json would replace dictionary_learning's."""
    ckpt = write(tmp_path, batchtopk_state())
    (ckpt.parent / "config.json").write_text(trainer_config("BatchTopKSAE"))
    with pytest.raises(CheckpointError, match="would replace dictionary_learning's config.json"):
        import_dictionary_learning(ckpt, ckpt.parent, overwrite=True)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ae.pt", "config.json"]


# --- the command line ---------------------------------------------------------------------------


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def import_sae(ckpt: Path, out: Path, *flags: str) -> list[str]:
    return ["import-sae", "--format", "dictionary_learning", "--ckpt", ckpt, "--out", out, *flags]


def test_import_sae_command_prints_a_summary(tmp_path, capsys):
    state = matryoshka_state()
    out = tmp_path / "out"
    argv = import_sae(write(tmp_path, state), out, "--site", "vision_tower", "--layer", "22")
    code, stdout, stderr = cli(capsys, *argv)
    assert (code, stderr) == (0, "")
    assert dict(line.split(None, 1) for line in stdout.splitlines()) == {
        "architecture": "matryoshka",
        "d_in": str(D),
        "n_concepts": str(N),
        "k": str(K),
        "groups": "4, 8, 16, 36 (nested)",
        "threshold": "2.34568",
        "source": "model not recorded, vision tower layer 22",
        "out": str(out.resolve()),
    }
    sae = load(out)
    assert (sae.config.source.site, sae.config.source.place) == ("vision_tower", "vision_tower:22")
    x = randn(8, D, seed=10)
    _, z, recon = reference(state, x)
    torch.testing.assert_close(sae(x).double(), recon, rtol=1e-5, atol=1e-4)


def test_unlearned_threshold_is_explained(tmp_path, capsys):
    ckpt = write(tmp_path, batchtopk_state() | {"threshold": torch.tensor(-1.0)})
    code, stdout, _ = cli(capsys, *import_sae(ckpt, tmp_path / "out"))
    assert code == 0
    assert "threshold    -1 (never learned: keeps every positive activation)" in stdout
    assert "source       model not recorded, site not recorded" in stdout


@pytest.mark.parametrize("check", [[], ["--check"]], ids=["config", "check"])
def test_info_on_an_imported_matryoshka(tmp_path, capsys, check):
    out = tmp_path / "out"
    assert main([str(a) for a in import_sae(write(tmp_path, matryoshka_state()), out)]) == 0
    capsys.readouterr()
    code, stdout, stderr = cli(capsys, "info", out, *check)
    assert (code, stderr) == (0, "")
    config = SAEConfig.model_validate_json(stdout)
    assert (config.architecture, config.groups, config.k) == ("matryoshka", GROUPS, K)


def _unknown(tmp_path: Path) -> Path:
    return write(tmp_path, _drop("threshold")(batchtopk_state()))


def _evil(tmp_path: Path) -> Path:
    return write(tmp_path, {"b_dec": Payload(tmp_path / "pwned")})


def _good(tmp_path: Path) -> Path:
    return write(tmp_path, batchtopk_state())


def _full_out(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    return write(tmp_path, batchtopk_state())


# (file, extra flags, what stderr must say); each must leave no out/ behind but what was there.
CLI_ERRORS = {
    "unknown-keys": (_unknown, [], "unknown state-dict layout"),
    "pickled-code": (_evil, [], "cannot be read as a tensors-only torch checkpoint"),
    "non-empty-out": (_full_out, [], "not empty; pass --overwrite"),
    "vision-tower-needs-layer": (
        _good, ["--site", "vision_tower"], "Value error, site 'vision_tower' needs a layer index"
    ),
    "missing-file": (lambda p: p / "nope.pt", [], "--ckpt: Path does not point to a file"),
}  # fmt: skip


@pytest.mark.parametrize(("make", "flags", "fragment"), CLI_ERRORS.values(), ids=CLI_ERRORS)
def test_import_sae_errors_exit_2(tmp_path, capsys, make, flags, fragment):
    ckpt, out = make(tmp_path), tmp_path / "out"
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    code, stdout, stderr = cli(capsys, *import_sae(ckpt, out, *flags))
    assert (code, stdout) == (2, "")
    assert stderr.startswith("vlsae-guard import-sae: error: ")
    assert fragment in stderr and "Traceback" not in stderr
    assert not (tmp_path / "pwned").exists()
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before


def test_format_is_required_and_checked(tmp_path, capsys):
    ckpt = write(tmp_path, batchtopk_state())
    argv = ["import-sae", "--ckpt", ckpt, "--out", tmp_path / "out"]
    assert cli(capsys, *argv)[0] == 2
    code, _, stderr = cli(capsys, *argv, "--format", "sae_lens")
    assert code == 2 and "invalid choice: 'sae_lens'" in stderr
    assert not (tmp_path / "out").exists()
