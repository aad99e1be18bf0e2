"""Shared fixtures: tiny random-weight LLaVA checkpoints in the real on-disk layouts.

Built once per session (a few seconds, offline) by :mod:`vlsae_guard.lab.tiny`. The loaded models
are session-scoped too: tests that hook or steer them must undo it before returning.
"""

from __future__ import annotations

import pytest
import torch

from vlsae_guard.lab import tiny


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
    pytest.importorskip("llava", reason="original LLaVA not installed (requirements/llava.txt)")
    from transformers import AutoTokenizer

    from vlsae_guard.backends import ensure_llava_importable

    ensure_llava_importable()
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    model = LlavaLlamaForCausalLM.from_pretrained(tiny_llava_dir, dtype=torch.float32).eval()
    model.get_vision_tower().load_model()
    return model, AutoTokenizer.from_pretrained(tiny_llava_dir)
