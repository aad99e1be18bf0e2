"""Tiny random-weight LLaVA checkpoints, built offline from a seed, in the real hub layouts.

Tests and the demo cannot download ``llava-hf/llava-1.5-7b-hf``, so they run on these instead.
What matters is that the *files* look like the real ones (key names, config fields, tokenizer
and processor files), so that every loader (transformers, vLLM, the original ``llava`` package)
takes the same code path as with a 7B checkpoint. The weights are random but scaled so that
greedy answers depend on the image (a model that says the same thing for every image would
let steering bugs pass unnoticed).

The same ``seed`` gives the same language model, projector and vision tower in
:func:`build_hf_llava` and :func:`build_original_llava`, so the two backends can be compared.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

UNK, BOS, EOS, IMAGE, PAD = "<unk>", "<s>", "</s>", "<image>", "<pad>"

# Enough English for POPE-style questions, captions and LLaVA's system prompt; anything else
# still tokenizes (WordPiece falls back to characters), it just takes more tokens.
_WORD_TEXT = """
a an the this that these those it its is are was be been being do does did has have had can
could will would should may might must not no yes there here what which who whom whose why how
when where many much more most some any all each every both few other another such only own
same so than too very just also in on at of to for from with without by about above below
under over between into through during before after up down out off again further then once
and or but if because as until while i me my we our you your he him his she her they them
their image picture photo photograph scene view describe description detail details detailed
please answer question questions using single word phrase short brief caption object objects
thing things color colour colors shape shapes size background foreground left right top bottom
center middle front behind near next side corner large small big little tiny huge long tall
round flat bright dark light red green blue yellow orange purple pink brown black white gray
grey gold silver circle square triangle rectangle line dot star cross box ring one two three
four five six seven eight nine ten zero first second third number count many several person
people man woman boy girl child bicycle car motorcycle airplane bus train truck boat traffic
fire hydrant stop sign parking meter bench bird cat dog horse sheep cow elephant bear zebra
giraffe backpack umbrella handbag tie suitcase frisbee skis snowboard sports ball kite baseball
bat glove skateboard surfboard tennis racket bottle wine glass cup fork knife spoon bowl banana
apple sandwich broccoli carrot hot pizza donut cake chair couch potted plant bed dining table
toilet tv laptop mouse remote keyboard cell phone microwave oven toaster sink refrigerator book
clock vase scissors teddy hair drier toothbrush street road sky water grass tree wall floor
room building window door field snow beach food plate sitting standing holding walking
looking playing wearing shown visible present contains contain appear appears see seen look
chat curious human user artificial intelligence assistant gives helpful polite answers
"""
_WORDS = _WORD_TEXT.split()
_PUNCTUATION = list(".,?!:;'\"-()/")
_CHARS = [chr(c) for c in range(ord("a"), ord("z") + 1)]
_CHARS += [c.upper() for c in _CHARS] + [str(d) for d in range(10)]

# LLaVA-1.5's prompt format, as in llava-hf's processor: "USER: <image>\n{prompt} ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}{% for c in message['content'] %}{{ c['text'] + ' ' }}{% endfor %}{% endif %}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ c['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySizes:
    """Model sizes; head_dim 32 because vLLM's CPU attention rejects smaller heads."""

    image_size: int = 28
    patch_size: int = 4
    vision_hidden: int = 64
    vision_intermediate: int = 128
    vision_layers: int = 3
    vision_heads: int = 2
    text_hidden: int = 64
    text_intermediate: int = 128
    text_layers: int = 2
    text_heads: int = 2

    @property
    def image_seq_length(self) -> int:
        """Image tokens per image: one per patch (the CLS token is dropped, strategy "default")."""
        return (self.image_size // self.patch_size) ** 2


def vocabulary() -> list[str]:
    """Token strings in id order: Llama's ``<unk> <s> </s>`` first, ``<image> <pad>`` last."""
    words = list(dict.fromkeys(_WORDS + [w.capitalize() for w in _WORDS] + ["USER", "ASSISTANT"]))
    pieces = _CHARS + ["##" + c for c in _CHARS]
    body = list(dict.fromkeys(["\n", *_PUNCTUATION, *words, *pieces]))
    return [UNK, BOS, EOS, *body, IMAGE, PAD]


def build_tokenizer(directory: str | os.PathLike) -> Path:
    """Save a fast tokenizer (``AutoTokenizer.from_pretrained(directory)`` loads it).

    Word-level pieces with WordPiece character fallback, so any ASCII text encodes without
    ``<unk>`` and generated ids decode to space-separated words. Like Llama it prepends
    ``<s>``; like llava-hf it has ``<image>`` as a special token, ``<pad>`` and left padding.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    tok = Tokenizer(models.WordPiece(vocab, unk_token=UNK, max_input_chars_per_word=100))
    # Words, single punctuation marks and newlines are tokens; other whitespace separates.
    tok.pre_tokenizer = pre_tokenizers.Split(
        Regex(r"\w+|[^\w\s]|\n"), behavior="removed", invert=True
    )
    # Glue "##" pieces to their word and punctuation/newlines to the word before them.
    tok.decoder = decoders.Sequence(
        [
            decoders.WordPiece(prefix="##", cleanup=False),
            decoders.Replace(Regex(r"^ (?=[.,?!:;)'\n])"), ""),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        padding_side="left",
        model_max_length=2048,
        chat_template=CHAT_TEMPLATE,
    )
    # Same ids as in the vocabulary: registering an existing token only marks it special.
    fast.add_special_tokens({"additional_special_tokens": [IMAGE]})
    out = Path(directory)
    fast.save_pretrained(out)
    # Name the class and the image token the way transformers 4.x reads them too (vLLM may run
    # on either major version); 5.x maps "PreTrainedTokenizerFast" to its tokenizers backend.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("backend", None)
    config.update(
        tokenizer_class="PreTrainedTokenizerFast",
        extra_special_tokens={"image_token": IMAGE},
        clean_up_tokenization_spaces=False,
    )
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def make_images(n: int, seed: int = 0, size: tuple[int, int] = (40, 32)) -> list[Image.Image]:
    """``n`` distinct RGB images (a coloured shape on a coloured background), reproducible."""
    rng = np.random.default_rng(seed)
    width, height = size
    images = []
    for i in range(n):
        bg, fg = (tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(2))
        img = Image.new("RGB", size, bg)
        draw = ImageDraw.Draw(img)
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        x1 = int(rng.integers(x0 + width // 4, width + 1))
        y1 = int(rng.integers(y0 + height // 4, height + 1))
        shape = ("ellipse", "rectangle", "polygon")[i % 3]
        if shape == "polygon":
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fg)
        else:
            getattr(draw, shape)([x0, y0, x1, y1], fill=fg)
        images.append(img)
    return images


def _configs(sizes: TinySizes, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(
        hidden_size=sizes.vision_hidden,
        intermediate_size=sizes.vision_intermediate,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads,
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
        projection_dim=sizes.vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=sizes.text_hidden,
        intermediate_size=sizes.text_intermediate,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads,
        num_key_value_heads=sizes.text_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return vision, text


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from a private generator (global RNG untouched).

    Unit-variance embeddings and ``1/sqrt(fan_in)`` matrices instead of transformers' 0.02
    init, which lets the token embeddings dominate so that all images get the same greedy
    answer; and twice that for the language model's queries and keys: sharper attention picks
    out particular image tokens instead of averaging them (NeXT has hundreds), without it some
    images still share an answer or repeat one token.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and ("norm" in name or name.endswith(".bias")):
                param.copy_(torch.ones_like(param) if name.endswith("weight") else 0 * param)
                continue
            fan_in = param[0].numel() if param.ndim > 1 and "embed_tokens" not in name else 1
            std = fan_in**-0.5
            if "language_model" in name and name.endswith(("q_proj.weight", "k_proj.weight")):
                std *= 2
            param.copy_(torch.randn(param.shape, generator=gen) * std)


# transformers >= 4.52 / 5.x module names -> the names in llava-hf's model.safetensors.
_HUB_RENAMES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),
)
_CLIP = "vision_tower.vision_model."


def hub_key(name: str) -> str:
    """The llava-hf checkpoint name of a parameter of ``Llava(Next)ForConditionalGeneration``.

    transformers 5 flattens ``CLIPVisionModel`` (no ``vision_model.`` level) and nests the
    language model under ``model.``; its loader maps the hub names back, vLLM's expects them.
    """
    for new, old in _HUB_RENAMES:
        if name.startswith(new):
            name = old + name[len(new) :]
            break
    if name.startswith("vision_tower.") and not name.startswith(_CLIP):
        name = _CLIP + name[len("vision_tower.") :]
    return name


def _save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in state.items()}
    save_file(tensors, path, metadata={"format": "pt"})


def llava_config(sizes: TinySizes, tokenizer, next: bool = False):
    """The ``Llava(Next)Config`` of a tiny model with these sizes and this tokenizer."""
    from transformers import LlavaConfig, LlavaNextConfig

    vision, text = _configs(sizes, tokenizer)
    common = dict(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    if next:
        return LlavaNextConfig(image_grid_pinpoints=_pinpoints(sizes), **common)
    return LlavaConfig(image_seq_length=sizes.image_seq_length, **common)


def _model_class(next: bool):
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration if next else LlavaForConditionalGeneration


def _hub_state(next: bool, sizes: TinySizes, tokenizer, seed: int):
    """(config, hub-named weights) of a randomized tiny LLaVA(-NeXT)."""
    config = llava_config(sizes, tokenizer, next)
    cls = _model_class(next)
    with torch.random.fork_rng(devices=[]):  # construction draws from the global RNG
        model = cls(config)
    randomize(model, seed)
    config.architectures = [cls.__name__]
    return config, {hub_key(k): v for k, v in model.state_dict().items()}


def _pinpoints(sizes: TinySizes) -> list[list[int]]:
    s = sizes.image_size
    return [[s, 2 * s], [2 * s, s], [2 * s, 2 * s]]


def _image_processor_kwargs(sizes: TinySizes) -> dict:
    s = sizes.image_size
    return dict(size={"shortest_edge": s}, crop_size={"height": s, "width": s})


def build_hf_llava(
    directory: str | os.PathLike, *, seed: int = 0, next: bool = False, **sizes: int
) -> Path:
    """Save a tiny ``llava-hf``-style checkpoint; returns ``directory``.

    ``next=True`` makes a LLaVA-NeXT (anyres, vicuna prompt format) one. ``sizes`` override
    :class:`TinySizes` fields. ``from_pretrained(directory)`` and ``AutoProcessor`` load it.
    """
    from transformers import AutoTokenizer

    tiny = TinySizes(**sizes)
    out = Path(directory)
    tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(out))
    config, state = _hub_state(next, tiny, tokenizer, seed)
    return _write_hf(out, config, state, tokenizer, tiny, next)


def save_hf_llava(model: torch.nn.Module, directory: str | os.PathLike, sizes: TinySizes) -> Path:
    """Save a (trained) tiny ``Llava(Next)ForConditionalGeneration`` as :func:`build_hf_llava`
    does: hub-layout weight names, this module's tokenizer and processor; returns ``directory``.
    """
    from transformers import AutoTokenizer

    out = Path(directory)
    tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(out))
    next = type(model).__name__.startswith("LlavaNext")
    config = model.config
    config.architectures = [_model_class(next).__name__]
    state = {hub_key(k): v for k, v in model.state_dict().items()}
    return _write_hf(out, config, state, tokenizer, sizes, next)


def _write_hf(out: Path, config, state, tokenizer, tiny: TinySizes, next: bool) -> Path:
    from transformers import (
        CLIPImageProcessor,
        GenerationConfig,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        LlavaProcessor,
    )

    config.dtype = "float32"
    config.save_pretrained(out)
    _save_weights(state, out / "model.safetensors")
    GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    ).save_pretrained(out)

    # num_additional_image_tokens=1 (CLS) with strategy "default" drops it again: one image
    # token per patch, as in llava-hf's processor_config.json.
    processor_kwargs = dict(
        tokenizer=tokenizer,
        patch_size=tiny.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    if next:
        image_processor = LlavaNextImageProcessor(
            image_grid_pinpoints=_pinpoints(tiny), **_image_processor_kwargs(tiny)
        )
        processor = LlavaNextProcessor(image_processor=image_processor, **processor_kwargs)
    else:
        image_processor = CLIPImageProcessor(**_image_processor_kwargs(tiny))
        processor = LlavaProcessor(image_processor=image_processor, **processor_kwargs)
    processor.save_pretrained(out)
    build_tokenizer(out)  # the processor rewrote the tokenizer files in its own format
    (out / "tiny_sizes.json").write_text(json.dumps(asdict(tiny), indent=2) + "\n")
    return out


# llava-hf name prefix -> original LLaVA name prefix (liuhaotian/llava-v1.5-7b layout).
_ORIGINAL_RENAMES = (
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
    ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
)
VISION_TOWER_SUBDIR = "vision_tower"


def build_original_llava(directory: str | os.PathLike, *, seed: int = 0, **sizes: int) -> Path:
    """Save a tiny checkpoint in the original LLaVA-1.5 layout (``pip install llava-torch``).

    Like ``liuhaotian/llava-v1.5-7b``: a ``LlavaLlamaForCausalLM`` config with the ``mm_*``
    fields, language model + ``mm_projector`` weights only, and ``mm_vision_tower`` naming a
    separate CLIP checkpoint (here ``directory/vision_tower``, an absolute path because the
    llava code tests ``os.path.exists``; move the directory and it must be rebuilt). Same
    weights as :func:`build_hf_llava` with the same ``seed`` and ``sizes``.

    After :func:`vlsae_guard.backends.ensure_llava_importable`, the llava code
    loads it as a 7B checkpoint: ``load_pretrained_model(directory, None, "llava-tiny",
    device="cpu", device_map="cpu")`` (needs ``accelerate``; always casts to float16). For
    float32, do what it does without the cast: ``LlavaLlamaForCausalLM.from_pretrained(
    directory, dtype=torch.float32)`` then ``model.get_vision_tower().load_model()``.
    """
    from transformers import AutoTokenizer, CLIPImageProcessor

    tiny = TinySizes(**sizes)
    out = Path(directory).absolute()
    tokenizer = AutoTokenizer.from_pretrained(build_tokenizer(out))
    hf_config, state = _hub_state(False, tiny, tokenizer, seed)

    tower_dir = out / VISION_TOWER_SUBDIR
    hf_config.vision_config.architectures = ["CLIPVisionModel"]
    hf_config.vision_config.save_pretrained(tower_dir)
    CLIPImageProcessor(**_image_processor_kwargs(tiny)).save_pretrained(tower_dir)
    tower = {k[len("vision_tower.") :]: v for k, v in state.items() if k.startswith(_CLIP)}
    _save_weights(tower, tower_dir / "model.safetensors")

    lm = {}
    for name, tensor in state.items():
        for hub, original in _ORIGINAL_RENAMES:
            if name.startswith(hub):
                lm[original + name[len(hub) :]] = tensor
    _save_weights(lm, out / "model.safetensors")

    text = hf_config.text_config
    config = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",  # as in liuhaotian/llava-v1.5-7b (transformers warns)
        "hidden_act": "silu",
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": 10000.0,
        "vocab_size": text.vocab_size,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "pretraining_tp": 1,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": "float32",
        "image_aspect_ratio": "pad",
        "mm_hidden_size": tiny.vision_hidden,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": str(tower_dir),
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",  # real value: batches are re-padded on the right
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "tiny_sizes.json").write_text(json.dumps(asdict(tiny), indent=2) + "\n")
    return out
