"""Model families: the one original-LLaVA loader against the llava package's own builder."""

from __future__ import annotations

import json

import pytest
import torch

from vlsae_guard import backends
from vlsae_guard.lab import tiny

pytestmark = pytest.mark.llava


@pytest.fixture(scope="module")
def tiny_llava_tokens_dir(tmp_path_factory):
    """The tiny original checkpoint asking for the image patch and start/end tokens, which
    grows the tokenizer and so the embeddings (LLaVA-1.5 asks for neither)."""
    directory = tiny.build_original_llava(tmp_path_factory.mktemp("tiny-llava-tokens"), seed=0)
    file = directory / "config.json"
    config = json.loads(file.read_text())
    config.update(mm_use_im_start_end=True, mm_use_im_patch_token=True)
    file.write_text(json.dumps(config))
    return directory


def _builder(directory):
    pytest.importorskip("llava", reason="original LLaVA not installed (requirements/llava.txt)")
    backends.ensure_llava_importable()
    from llava.model.builder import load_pretrained_model

    tokenizer, model, image_processor, _ = load_pretrained_model(
        str(directory), None, "llava-tiny", device="cpu", device_map="cpu"
    )
    return tokenizer, model.eval(), image_processor


@pytest.mark.parametrize("which", ["tiny_llava_dir", "tiny_llava_tokens_dir"])
def test_original_loader_is_llavas_builder(which, request, tiny_images):
    """Same tokenizer, added tokens, weights, preprocessing and logits as the builder; in the
    builder's float16, so equal means bit for bit."""
    from llava.mm_utils import process_images, tokenizer_image_token

    directory = request.getfixturevalue(which)
    ref_tok, ref_model, ref_processor = _builder(directory)
    model, inputs = backends.load(str(directory), torch.float16, "cpu")
    tok = inputs.tokenizer
    assert type(tok) is type(ref_tok)
    assert tok.get_added_vocab() == ref_tok.get_added_vocab()
    assert len(tok) == len(ref_tok) == model.get_input_embeddings().num_embeddings
    vocab = json.loads((directory / "config.json").read_text())["vocab_size"]
    grown = len(tok) - vocab
    assert grown == (3 if which == "tiny_llava_tokens_dir" else 0)

    # resize_token_embeddings draws the new rows at random: give ours the builder's, so that
    # every other weight and every logit must agree exactly.
    for get in ("get_input_embeddings", "get_output_embeddings"):
        ours, ref = getattr(model, get)().weight, getattr(ref_model, get)().weight
        assert ours.shape == ref.shape and ours.dtype == ref.dtype == torch.float16
        with torch.no_grad():
            ours[vocab:] = ref[vocab:]
    ref_state = ref_model.state_dict()
    state = model.state_dict()
    assert state.keys() == ref_state.keys()
    assert all(torch.equal(state[k], ref_state[k]) for k in state)

    prompt = inputs.question_prompt("Is there a dog in the image?")
    assert ("<im_start><image><im_end>" in prompt) == (which == "tiny_llava_tokens_dir")
    batch = inputs.batch(tiny_images[:1], [prompt])
    ids = tokenizer_image_token(prompt, ref_tok, return_tensors="pt")[None]
    pixels = process_images(tiny_images[:1], ref_processor, ref_model.config)
    assert torch.equal(batch["input_ids"], ids)
    assert torch.equal(batch["images"], pixels)
    if grown:
        assert set(ids[0, :].tolist()) & set(range(vocab, len(tok)))  # the new tokens are read
    with torch.no_grad():
        ours = model(**backends.move(batch, "cpu", torch.float16)).logits
        ref = ref_model(input_ids=ids, images=pixels.half(), image_sizes=batch["image_sizes"])
    assert ours.dtype == torch.float16 and torch.isfinite(ours).all()
    assert torch.equal(ours, ref.logits)


def test_collection_and_generation_load_alike(tiny_llava_tokens_dir):
    """Both load through the one loader: generation's model has the grown tokenizer too."""
    from vlsae_guard.harness import generation

    backends.ensure_llava_importable()
    generator = generation.load("llava", str(tiny_llava_tokens_dir), "float32", "cpu")
    model, inputs = backends.load(str(tiny_llava_tokens_dir))
    assert len(generator.loaded.inputs.tokenizer) == len(inputs.tokenizer)
    assert generator.model.get_input_embeddings().num_embeddings == len(inputs.tokenizer)
    assert model.get_input_embeddings().num_embeddings == len(inputs.tokenizer)
