"""Checkpoints: lossless round trips, loud failures, and the import of the paper's files.

Every broken checkpoint must fail at load time with a :class:`CheckpointError` naming the file
and the problem, and leave the directory exactly as it was.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pickle_attack import Payload
from safetensors.torch import load_file, save_file
from torch import nn

from vlsae_guard import SAED, SAEV, VLSAE, AuxConfig, CheckpointError, SAEConfig, build
from vlsae_guard.core import reference
from vlsae_guard.core.checkpoint import import_official, load, save
from vlsae_guard.core.sae import SparseAutoencoder

D, N, K = 16, 40, 4
ARCHS = {"vl-sae": VLSAE, "sae-v": SAEV, "sae-d": SAED}
AUX = AuxConfig(d_vision=12, d_text=20, d_proj=D)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def make(architecture: str = "vl-sae", aux: bool = False) -> SparseAutoencoder:
    """A model whose every parameter (biases included) is random, so nothing passes by luck."""
    config = SAEConfig(
        architecture=architecture, d_in=D, n_concepts=N, k=K, aux=AUX if aux else None
    )
    sae = build(config)
    with torch.no_grad():
        for i, p in enumerate(sae.parameters()):
            p.copy_(randn(*p.shape, seed=i))
    return sae.eval()


def outputs(sae: SparseAutoencoder) -> list[torch.Tensor]:
    """Everything a checkpoint must reproduce: codes and reconstructions per modality."""
    x = randn(5, D, seed=99)
    outs = [t for m in ("vision", "text") for t in (sae.encode(x, m), sae(x, m))]
    if sae.aux is not None:
        outs += [sae.aux.project(randn(3, AUX.d_text, seed=98), "text")]
    return outs


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()
    }


def assert_load_fails(path: Path | str, *fragments: str, root: Path | None = None) -> str:
    """Load must raise a CheckpointError mentioning every fragment and touch nothing on disk."""
    root = root or (Path(path) if Path(path).is_dir() else Path(path).parent)
    before = snapshot(root)
    with pytest.raises(CheckpointError) as info:
        load(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert snapshot(root) == before
    return message


@pytest.mark.parametrize("aux", [False, True], ids=["plain", "aux"])
@pytest.mark.parametrize("architecture", ARCHS)
def test_round_trip(tmp_path, architecture, aux):
    sae = make(architecture, aux)
    sae.save_pretrained(tmp_path)
    loaded = ARCHS[architecture].from_pretrained(str(tmp_path))
    assert type(loaded) is ARCHS[architecture] and not loaded.training
    assert loaded.config == sae.config
    assert (tmp_path / "aux.safetensors").exists() == aux
    for got, want in zip(outputs(loaded), outputs(sae), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_load_casts_to_the_requested_dtype(tmp_path):
    save(make(aux=True), tmp_path)
    sae = load(tmp_path, dtype=torch.float64)
    assert {p.dtype for p in sae.parameters()} == {torch.float64}


def test_from_pretrained_refuses_another_architecture(tmp_path):
    save(make("sae-v"), tmp_path)
    assert isinstance(SparseAutoencoder.from_pretrained(str(tmp_path)), SAEV)
    with pytest.raises(TypeError, match="sae-v"):
        VLSAE.from_pretrained(str(tmp_path))


@pytest.fixture
def saved(tmp_path) -> Path:
    save(make(aux=True), tmp_path)
    return tmp_path


def read(file: Path) -> dict[str, torch.Tensor]:
    """Copies, not views of the memory map: overwriting a mapped file is a bus error."""
    return {k: v.clone() for k, v in load_file(file).items()}


def edit_tensors(file: Path, edit) -> None:
    tensors = read(file)
    edit(tensors)
    save_file(tensors, file)


def edit_config(directory: Path, **changes) -> None:
    file = directory / "config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def _set(name: str, value: torch.Tensor):
    return lambda t: t.__setitem__(name, value)


def _poison(name: str, value: float):
    def edit(t):
        t[name][0, 0] = value

    return edit


TENSOR_EDITS = {
    "wrong-shape": (_set("encoder", randn(N, D + 1)), "tensor encoder: expected shape (40, 16)"),
    "missing": (lambda t: t.pop("text_decoder.bias"), "missing tensor text_decoder.bias"),
    "unexpected": (_set("extra", randn(2)), "unexpected tensor extra"),
    "nan": (_poison("vision_decoder.weight", float("nan")), "vision_decoder.weight: 1 NaN/inf"),
    "inf": (_poison("encoder", float("inf")), "encoder: 1 NaN/inf"),
    "integer": (_set("encoder", torch.ones(N, D, dtype=torch.int64)), "floating-point"),
}


@pytest.mark.parametrize(("edit", "fragment"), TENSOR_EDITS.values(), ids=TENSOR_EDITS)
def test_bad_weights(saved, edit, fragment):
    edit_tensors(saved / "model.safetensors", edit)
    assert_load_fails(saved, "model.safetensors", "weights do not match the config", fragment)


def test_bad_aux_weights(saved):
    edit_tensors(saved / "aux.safetensors", _set("text_projection.weight", randn(D, 3)))
    assert_load_fails(saved, "aux.safetensors", "text_projection.weight: expected shape (16, 20)")


CONFIG_EDITS = {
    "more-concepts": ({"n_concepts": N + 1}, "model.safetensors", "expected shape (41, 16)"),
    "other-architecture": ({"architecture": "sae-v"}, "model.safetensors", "missing tensor"),
    "k-zero": ({"k": 0}, "config.json", "field k: Input should be greater than or equal to 1"),
    "k-too-big": ({"k": N + 1}, "config.json", "k must be <= n_concepts (40)"),
    "unknown-architecture": ({"architecture": "gpt"}, "config.json", "field architecture"),
    "typo": ({"n_concept": 3}, "config.json", "field n_concept: Extra inputs"),
    "no-aux-section": ({"aux": None}, "aux.safetensors", "no aux section"),
}


@pytest.mark.parametrize(("changes", "file", "fragment"), CONFIG_EDITS.values(), ids=CONFIG_EDITS)
def test_config_weights_mismatch(saved, changes, file, fragment):
    edit_config(saved, **changes)
    assert_load_fails(saved, file, fragment)


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _garbage(file: Path) -> None:
    file.write_bytes(b"\x00\xff not UTF-8, not a safetensors header" * 10)


def _torch_save(file: Path) -> None:
    torch.save(read(file), file)


FILE_EDITS = {
    "truncated": ("model.safetensors", _truncate, "unreadable or truncated"),
    "garbage": ("model.safetensors", _garbage, "unreadable or truncated"),
    "pickle-weights": ("model.safetensors", _torch_save, "is a pickle/torch.save file"),
    "truncated-aux": ("aux.safetensors", _truncate, "unreadable or truncated"),
    "missing-aux": ("aux.safetensors", Path.unlink, "aux.safetensors: missing"),
    "missing-config": ("config.json", Path.unlink, "config.json: missing"),
    "invalid-json": ("config.json", lambda f: f.write_text('{"d_in": 16,'), "not valid JSON"),
    "binary-config": ("config.json", _garbage, "not valid JSON"),
}


@pytest.mark.parametrize(("name", "edit", "fragment"), FILE_EDITS.values(), ids=FILE_EDITS)
def test_broken_files(saved, name, edit, fragment):
    edit(saved / name)
    assert_load_fails(saved, name, fragment)


@pytest.mark.parametrize("first_bytes", [b"\x80", b"\x80\x02"], ids=["PROTO", "PROTO-2"])
def test_header_length_that_looks_like_a_pickle_still_loads(saved, first_bytes):
    """A safetensors file starts with its header length: any bytes, pickle magic included."""
    file = saved / "model.safetensors"
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    target = int.from_bytes(first_bytes, "little")
    width = 8 * len(first_bytes)
    padded = length + (target - length) % (1 << width)  # the spec allows space padding
    header = raw[8 : 8 + length] + b" " * (padded - length)
    file.write_bytes(padded.to_bytes(8, "little") + header + raw[8 + length :])
    assert file.read_bytes().startswith(first_bytes)
    for got, want in zip(outputs(load(saved)), outputs(make(aux=True)), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_pickle_file_passed_as_directory(tmp_path):
    file = tmp_path / "vlsae.pth"
    torch.save(make().state_dict(), file)
    assert_load_fails(file, "vlsae.pth", "found a file", "import-official")


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """An empty working directory, with the Hub switched off after huggingface_hub's import."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("nope", "no such directory, and not a Hub repo id"),
        ("./owner/name", "no such directory, and not a Hub repo id"),
        ("a/b/c", "no such directory, and not a Hub repo id"),
        ("bad name/repo", "not a valid Hub repo id"),
    ],
)
def test_nonexistent_path_that_is_not_a_hub_id(offline, path, fragment):
    assert_load_fails(path, path, fragment, root=offline)


def test_hub_id_while_offline(offline):
    message = assert_load_fails(
        "vlsae-test/does-not-exist", "vlsae-test/does-not-exist", root=offline
    )
    assert "offline" in message and "cannot be reached" in message


# --- import_official ---------------------------------------------------------------------------


def official_state(architecture: str, d: int = D, n: int = N) -> dict[str, torch.Tensor]:
    """State dicts exactly as the paper's modules save them (decoders: nn.Linear(n -> d))."""
    torch.manual_seed(7)
    if architecture == "vl-sae":
        linears = {"vision_decoder": nn.Linear(n, d), "text_decoder": nn.Linear(n, d)}
        state = {"encoder": nn.Parameter(torch.randn(n, d))}
    elif architecture == "sae-v":
        linears = {"encoder": nn.Linear(d, n), "decoder.0": nn.Linear(n, d)}
        state = {}
    else:
        linears = {
            "v_encoder": nn.Linear(d, n),
            "t_encoder": nn.Linear(d, n),
            "vision_decoder.0": nn.Linear(n, d),
            "text_decoder.0": nn.Linear(n, d),
        }
        state = {}
    for prefix, lin in linears.items():
        state |= {f"{prefix}.{k}": v for k, v in lin.state_dict().items()}
    return state


def official_aux_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(8)
    modules = {
        "vision_projection": nn.Linear(AUX.d_vision, D),
        "text_projection": nn.Linear(AUX.d_text, D),
        "vision_decoder": nn.Linear(D, AUX.d_vision),
        "text_decoder": nn.Linear(D, AUX.d_text),
    }
    return {f"{m}.{k}": v for m, lin in modules.items() for k, v in lin.state_dict().items()}


# Official formulas on the official tensors, in float64: (encoder keys, decoder prefix) per
# modality. The decoders there are nn.Linear, i.e. z @ weight.T + bias.
OFFICIAL_PARTS = {
    "vl-sae": {"vision": ("encoder", "vision_decoder"), "text": ("encoder", "text_decoder")},
    "sae-v": {"vision": ("encoder", "decoder.0"), "text": ("encoder", "decoder.0")},
    "sae-d": {"vision": ("v_encoder", "vision_decoder.0"), "text": ("t_encoder", "text_decoder.0")},
}


def official_forward(state, architecture, modality, x):
    s = {k: v.detach().double() for k, v in state.items()}
    enc, dec = OFFICIAL_PARTS[architecture][modality]
    if architecture == "vl-sae":
        z = reference.encode(x.double(), s[enc], K)
    else:
        z = reference.sparsify(
            F.relu(F.linear(x.double(), s[f"{enc}.weight"], s[f"{enc}.bias"])), K
        )
    return z, reference.decode(z, s[f"{dec}.weight"].T, s[f"{dec}.bias"])


@pytest.mark.parametrize("architecture", ARCHS)
def test_import_official_matches_official_formulas(tmp_path, architecture):
    state = official_state(architecture)
    torch.save(state, tmp_path / "sae.pth")
    sae = import_official(tmp_path / "sae.pth", tmp_path / "out", k=K)
    assert type(sae) is ARCHS[architecture]
    assert (sae.config.architecture, sae.config.d_in, sae.config.n_concepts, sae.config.k) == (
        architecture,
        D,
        N,
        K,
    )
    x = randn(6, D, seed=1)
    reloaded = load(tmp_path / "out")
    for modality in ("vision", "text"):
        z, recon = official_forward(state, architecture, modality, x)
        for model in (sae, reloaded):
            torch.testing.assert_close(model.encode(x, modality).double(), z, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(model(x, modality).double(), recon, rtol=1e-5, atol=1e-5)


def test_import_official_with_aux(tmp_path):
    torch.save(official_state("vl-sae"), tmp_path / "sae.pth")
    aux = official_aux_state()
    torch.save(aux, tmp_path / "aux.pt")
    sae = import_official(tmp_path / "sae.pth", tmp_path / "out", aux_file=tmp_path / "aux.pt", k=K)
    assert sae.config.aux == AUX
    reloaded = load(tmp_path / "out")
    for modality, width in (("vision", AUX.d_vision), ("text", AUX.d_text)):
        x = randn(3, width, seed=2)
        w, b = aux[f"{modality}_projection.weight"], aux[f"{modality}_projection.bias"]
        expected = F.linear(x.double(), w.double(), b.double())
        for model in (sae, reloaded):
            torch.testing.assert_close(
                model.aux.project(x, modality).double(), expected, rtol=1e-5, atol=1e-5
            )


def test_import_official_default_k_is_256(tmp_path):
    torch.save(official_state("vl-sae", d=4, n=300), tmp_path / "sae.pth")
    assert import_official(tmp_path / "sae.pth", tmp_path / "out").config.k == 256
    assert load(tmp_path / "out").config.k == 256


WRAPPERS = {
    "legacy-format": (lambda s: s, {"_use_new_zipfile_serialization": False}),
    "state_dict-key": (lambda s: {"state_dict": s}, {}),
    "data-parallel": (lambda s: {f"module.{k}": v for k, v in s.items()}, {}),
}


@pytest.mark.parametrize(("wrap", "kwargs"), WRAPPERS.values(), ids=WRAPPERS)
def test_import_official_accepts_common_wrappings(tmp_path, wrap, kwargs):
    state = official_state("sae-d")
    torch.save(wrap(state), tmp_path / "sae.pth", **kwargs)
    sae = import_official(tmp_path / "sae.pth", tmp_path / "out", k=K)
    torch.testing.assert_close(sae.text_decoder.weight, state["text_decoder.0.weight"].T)


def _drop_bias(state):
    state.pop("vision_decoder.bias")
    return state


def _vector_encoder(state):
    state["encoder"] = torch.randn(N)
    return state


def _short_decoder(state):
    state["text_decoder.weight"] = torch.randn(D - 1, N)
    return state


IMPORT_ERRORS = {
    "unknown-layout": (_drop_bias, {}, "sae.pth: unknown state-dict layout"),
    "vector-encoder": (_vector_encoder, {}, "tensor encoder should be a non-empty matrix"),
    "shape-mismatch": (_short_decoder, {}, "text_decoder.weight: expected shape (40, 16)"),
    "k-too-big": (lambda s: s, {"k": N + 1}, "k must be <= n_concepts"),
    "k-zero": (lambda s: s, {"k": 0}, "field k"),
    "not-a-dict": (lambda s: [s["encoder"]], {"k": K}, "expected a state dict of tensors"),
}


@pytest.mark.parametrize(("edit", "kwargs", "fragment"), IMPORT_ERRORS.values(), ids=IMPORT_ERRORS)
def test_import_official_errors_write_nothing(tmp_path, edit, kwargs, fragment):
    torch.save(edit(official_state("vl-sae")), tmp_path / "sae.pth")
    with pytest.raises(CheckpointError, match="sae.pth") as info:
        import_official(tmp_path / "sae.pth", tmp_path / "out", **{"k": K, **kwargs})
    assert fragment in str(info.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("aux", "fragment"),
    [
        ({"vision_projection.weight": torch.randn(D, 3)}, "expected auxiliary AE keys"),
        (official_aux_state() | {"text_projection.weight": torch.randn(D)}, "non-empty matrix"),
        (
            {
                k: torch.randn(D + 1, *v.shape[1:]) if "projection" in k else v
                for k, v in official_aux_state().items()
            },
            "aux.d_proj (17) must equal d_in (16)",
        ),
    ],
    ids=["keys", "vector", "d_proj"],
)
def test_import_official_bad_aux(tmp_path, aux, fragment):
    torch.save(official_state("vl-sae"), tmp_path / "sae.pth")
    torch.save(aux, tmp_path / "aux.pt")
    with pytest.raises(CheckpointError) as info:
        import_official(tmp_path / "sae.pth", tmp_path / "out", aux_file=tmp_path / "aux.pt", k=K)
    assert fragment in str(info.value)
    assert not (tmp_path / "out").exists()


def test_import_official_never_unpickles_code(tmp_path):
    torch.save({"encoder": Payload(tmp_path / "proof")}, tmp_path / "live.pth")
    torch.load(tmp_path / "live.pth", weights_only=False)  # the payload is live ...
    assert (tmp_path / "proof").exists()

    marker = tmp_path / "pwned"
    torch.save({"encoder": Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth: cannot be read as a tensors-only"):
        import_official(tmp_path / "evil.pth", tmp_path / "out", k=K)
    assert not marker.exists()  # ... but import_official never ran it
    assert not (tmp_path / "out").exists()
