"""Helpers of the decoding tests (fused decoding, methods, DoLa): a left-padded batch of prompts
with one image each, and one sample of it alone, without its padding."""

from __future__ import annotations


def left_padded(processor, images, prompts) -> dict:
    """``prompts`` (one image each) as one batch, left-padded as generation pads it."""
    tok = processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        out = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    assert (out["attention_mask"] == 0).any(), "the prompts' lengths must differ"
    return dict(out)


def alone(inputs: dict, i: int) -> dict:
    """Sample ``i`` of a :func:`left_padded` batch alone, without its padding."""
    keep = inputs["attention_mask"][i].bool()
    return {
        "input_ids": inputs["input_ids"][i : i + 1, keep],
        "attention_mask": inputs["attention_mask"][i : i + 1, keep],
        "pixel_values": inputs["pixel_values"][i : i + 1],
    }
