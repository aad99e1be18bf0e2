"""Shared fixtures: tiny random-weight LLaVA checkpoints in the real on-disk layouts, a VL-SAE
for them, the README's code blocks and what the vLLM tests share.

Built once per session (a few seconds, offline) by :mod:`vlsae_guard.lab.tiny`. The loaded models
are session-scoped too: tests that hook or steer them must undo it before returning.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from vlsae_guard import VLSAE, SAEConfig, guard
from vlsae_guard.lab import tiny

README = Path(__file__).resolve().parents[1] / "README.md"


def pytest_collection_modifyitems(config, items):
    """Leave out tests marked ``slow`` unless ``-m`` names them or tests are picked by node id.

    So the fast suite stays fast whatever else ``-m`` selects (``-m "not vllm"``);
    scripts/test.sh runs ``-m "slow and not vllm"`` after it.
    """
    if "slow" in (config.option.markexpr or "") or any("::" in a for a in config.args):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """llava-hf/llava-1.5-style checkpoint directory (``LlavaForConditionalGeneration``)."""
    return tiny.build_hf_llava(tmp_path_factory.mktemp("tiny-llava-hf"), seed=0)


@pytest.fixture(scope="session")
def tiny_next_dir(tmp_path_factory):
    """llava-hf/llava-v1.6-style checkpoint directory (``LlavaNextForConditionalGeneration``)."""
    return tiny.build_hf_llava(tmp_path_factory.mktemp("tiny-llava-next"), seed=0, next=True)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """liuhaotian/llava-v1.5-style checkpoint directory; same weights as ``tiny_hf_dir``."""
    return tiny.build_original_llava(tmp_path_factory.mktemp("tiny-llava-original"), seed=0)


@pytest.fixture(scope="session")
def tiny_images():
    """Four distinct non-square RGB images (so resizing, cropping and padding all happen)."""
    return tiny.make_images(4, seed=0)


def _load_hf(directory, model_cls):
    from transformers import AutoProcessor

    model = model_cls.from_pretrained(directory, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(directory)


@pytest.fixture(scope="session")
def hf_model_and_processor(tiny_hf_dir):
    from transformers import LlavaForConditionalGeneration

    return _load_hf(tiny_hf_dir, LlavaForConditionalGeneration)


@pytest.fixture(scope="session")
def next_model_and_processor(tiny_next_dir):
    from transformers import LlavaNextForConditionalGeneration

    return _load_hf(tiny_next_dir, LlavaNextForConditionalGeneration)


@pytest.fixture(scope="session")
def llava_model_and_tokenizer(tiny_llava_dir):
    """(``LlavaLlamaForCausalLM``, tokenizer), fp32; ``model.get_vision_tower().image_processor``.

    ``load_pretrained_model`` would do the same but always casts to float16, which breaks
    exact comparisons with the HF model; ``test_tiny`` checks that it loads the checkpoint too.
    """
    return _load_llava(tiny_llava_dir)


@pytest.fixture(scope="session")
def load_llava():
    """Loads another ``llava_model_and_tokenizer``: for a test that leaves state on the model
    (e.g. transformers' output-capturing hooks, left after ``output_hidden_states=True``)."""
    return _load_llava


def _load_llava(directory):
    pytest.importorskip("llava", reason="original LLaVA not installed (requirements/llava.txt)")
    from transformers import AutoTokenizer

    from vlsae_guard.backends import ensure_llava_importable

    ensure_llava_importable()
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    model = LlavaLlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    model.get_vision_tower().load_model()
    return model, AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="session")
def tiny_sae_dir(tmp_path_factory) -> Path:
    """A random VL-SAE checkpoint for the tiny models (width 64), every third concept shared."""
    config = SAEConfig(
        d_in=tiny.TinySizes().text_hidden,
        n_concepts=256,
        k=16,
        shared_concepts=list(range(0, 256, 3)),
        source={"site": "projector"},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sae = VLSAE(config).eval()
    directory = tmp_path_factory.mktemp("tiny-sae")
    sae.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def layer_sae():
    """A random VL-SAE of the tiny models' width for paper mode (decoder-layer states)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return VLSAE(SAEConfig(d_in=64, n_concepts=128, k=8)).eval()


# --- README.md's code blocks ------------------------------------------------------------------


@dataclass(frozen=True)
class Snippet:
    """A fenced block of README.md: language, the ``<!-- test: TAG -->`` line before it, if any."""

    lang: str
    tag: str | None
    code: str
    line: int

    def with_values(self, **values) -> str:
        """The code with its ``NAME = "..."`` line set to each value (the line must be there)."""
        code = self.code
        for name, value in values.items():
            code, n = re.subn(rf'^{name} = "[^"]*"', f"{name} = {str(value)!r}", code, flags=re.M)
            if n != 1:
                raise AssertionError(
                    f'README.md:{self.line}: expected one line `{name} = "..."`, found {n}'
                )
        return code


_FENCE = re.compile(r"^(?:<!-- test: (\w+) -->\n)?```(\w*)\n(.*?)^```$", re.S | re.M)


@pytest.fixture(scope="session")
def pope_inputs(tmp_path_factory, tiny_images) -> Path:
    """Four images, eight POPE questions about them (``questions.jsonl``) and a VL-SAE for the
    tiny models (``sae/``): what the benchmark-runner tests answer."""
    from _pope import write_inputs, write_sae

    root = write_inputs(tmp_path_factory.mktemp("pope-inputs"), tiny_images)
    write_sae(root)
    return root


@pytest.fixture(scope="session")
def readme_snippets() -> list[Snippet]:
    text = README.read_text()
    return [
        Snippet(m[2], m[1], m[3], text.count("\n", 0, m.start()) + 1) for m in _FENCE.finditer(text)
    ]


# --- the vLLM tests (tests/test_vllm_*.py, which skip without vllm) ---------------------------


@dataclass(frozen=True)
class VLLMCase:
    """Settings, engine arguments and reference answers that the vLLM tests share.

    The references come from the transformers backend with :func:`vlsae_guard.guard` (fp32,
    greedy, one request at a time), so every vLLM answer is checked against the implementation
    the rest of the suite already trusts.
    """

    sae_dir: Path
    alpha: float = 0.8
    steps: int = 8
    tokens_per_image: int = tiny.TinySizes().image_seq_length  # 49
    question: str = "Is there a dog in the image?"
    template: str = "USER: <image>\n{question} ASSISTANT:"  # the tiny chat template's rendering
    # Small, eager (no compile) and a fixed KV cache: quick to start on a 2-core CPU.
    engine: dict = field(
        default_factory=lambda: dict(
            dtype="float32",
            max_model_len=512,
            seed=0,
            enforce_eager=True,
            kv_cache_memory_bytes=256 << 20,
            limit_mm_per_prompt={"image": 1},
        )
    )

    @property
    def prompt(self) -> str:
        return self.template.format(question=self.question)

    def hf_reference(
        self, model_dir, images, sae=None, **settings
    ) -> dict[bool, list[tuple[int, ...]]]:
        """Greedy token ids per image with the guard off (False) and on (True), one at a time;
        by default this case's SAE and alpha, else ``sae`` with the guard ``settings``."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
        processor = AutoProcessor.from_pretrained(model_dir)
        out: dict[bool, list[tuple[int, ...]]] = {}
        for on in (False, True):
            settings = settings if sae is not None else {"alpha": self.alpha}
            handle = guard(model, sae or self.sae_dir, **settings) if on else None
            try:
                answers = []
                for image in images:
                    inputs = processor(images=[image], text=[self.prompt], return_tensors="pt")
                    with torch.no_grad():
                        ids = model.generate(**inputs, max_new_tokens=self.steps, do_sample=False)
                    answers.append(tuple(ids[0, inputs["input_ids"].shape[1] :].tolist()))
                out[on] = answers
            finally:
                if handle is not None:
                    handle.remove()
        return out

    def serve_offline(self, model_dir, sae_dir, **guard):
        """An offline vLLM engine for ``model_dir`` guarding with ``sae_dir`` and the ``guard``
        settings; yields it, then shuts it down (``yield from`` it in a fixture)."""
        from vlsae_guard.serving.client import load_llm
        from vlsae_guard.serving.settings import ServeSettings

        settings = ServeSettings(sae=str(sae_dir), guard=guard)
        llm = load_llm(str(model_dir), settings, **self.engine)
        yield llm
        llm.llm_engine.engine_core.shutdown()

    def answers(self, llm, images, guard) -> list[tuple[int, ...]]:
        """Greedy token ids per image from ``llm``; ``guard``: one switch, or one per image."""
        from vlsae_guard.serving.client import generate_offline

        prompts = [self.prompt] * len(images)
        out = generate_offline(llm, images, prompts, guard=guard, max_tokens=self.steps)
        return [a.token_ids for a in out]

    @staticmethod
    def read_log(path: Path) -> list[dict]:
        """The plugin's per-projector-call records (``VLSAE_GUARD_LOG``)."""
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    @staticmethod
    def differs(reference: dict[bool, list]) -> int:
        """How many images the guard changes the answer of (a test is only as good as this)."""
        return sum(a != b for a, b in zip(reference[False], reference[True], strict=True))


@pytest.fixture(scope="session")
def vllm_case(tiny_sae_dir) -> VLLMCase:
    return VLLMCase(tiny_sae_dir)


@pytest.fixture(scope="session")
def cue_sae_dir(tiny_sae_dir, tmp_path_factory):
    """``tiny_sae_dir`` with the test object map of cue masking (:mod:`_cue_support`)."""
    from _cue_support import object_map

    from vlsae_guard.core.checkpoint import load as load_sae

    directory = tmp_path_factory.mktemp("cue-sae") / "sae"
    shutil.copytree(tiny_sae_dir, directory)
    object_map(load_sae(directory), present=0.0).save(directory / "objects.json")
    return directory


@pytest.fixture(scope="module")
def restored_environ():
    """``os.environ``, restored when the module ends (``load_llm`` writes VLSAE_GUARD_*, and the
    engines read the environment when they start)."""
    saved = dict(os.environ)
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def allow_inspection(restored_environ):
    """Lets ``llm.apply_model`` send a function to the engine (vLLM refuses pickles without)."""
    restored_environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
