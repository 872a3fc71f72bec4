"""Offline, deterministic tiny models for tests, CI and the demo (``rea2seg build-tiny-models``).

- tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL: a byte-level BPE tokenizer trained here on a built-in corpus, the Qwen
  special tokens, each family's chat template and image processor (patch 14 or 16, 2x2 merge), the family's real
  config class at reduced sizes; random weights saved as safetensors (loadable by transformers and vLLM);
- a tiny SAM from segment_anything's modules: ``sam_config.json`` + ``model.safetensors``.

They go through the same loaders as real checkpoints (``rea2seg_ray.models.loading``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .cachedir import building
from .families import save_vlm
from .sam import build_sam, sam_config

QWEN2VL_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
QWEN_PRETOKENIZE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL's template has the same turn and vision-token layout, without a default system turn.
QWEN3VL_CHAT_TEMPLATE = QWEN2VL_CHAT_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}",
    "",
)
assert QWEN3VL_CHAT_TEMPLATE != QWEN2VL_CHAT_TEMPLATE

# Named tiny presets. initializer_range: ~0.02 gives flat attention (useless heat maps) and a loss plateau; larger
# values give structured attention (discovery) or a trainable start (scorer). See FIELD-NOTES.md.
# Each preset names its family (models.families); the newer families' presets serve as discovery model and scorer.
TINY_VLM_PRESETS: dict[str, dict] = {
    "tiny-qwen2-vl": dict(family="qwen2-vl", initializer_range=0.3, min_pixels=56 * 56, max_pixels=336 * 336),
    "tiny-qwen2-vl-scorer": dict(
        family="qwen2-vl", initializer_range=0.06, min_pixels=56 * 56, max_pixels=112 * 112
    ),
    "tiny-qwen2.5-vl": dict(
        family="qwen2.5-vl", initializer_range=0.3, min_pixels=56 * 56, max_pixels=336 * 336
    ),
    "tiny-qwen3-vl": dict(family="qwen3-vl", initializer_range=0.3, min_pixels=64 * 64, max_pixels=384 * 384),
    "tiny-internvl3": dict(family="internvl3", initializer_range=0.3),
    "tiny-llava-onevision": dict(family="llava-onevision", initializer_range=0.3),
}

# InternVL3's layout: the processor expands each image placeholder into <img> + tiles x <IMG_CONTEXT> + </img>.
INTERNVL_TOKENS = {
    "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}  # fmt: skip
LLAVA_OV_TOKENS = {"image_token": "<image>", "video_token": "<video>"}
# ChatML turns (as both families' Qwen2 language models use), the image placeholder where the content has one.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "IMAGE_PLACEHOLDER{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
INTERNVL_CHAT_TEMPLATE = CHATML_TEMPLATE.replace("IMAGE_PLACEHOLDER", "<IMG_CONTEXT>\n")
LLAVA_OV_CHAT_TEMPLATE = CHATML_TEMPLATE.replace("IMAGE_PLACEHOLDER", "<image>\n")
TINY_SAM_PRESETS: dict[str, dict] = {"tiny-sam": dict(model_type="tiny")}

_CORPUS_WORDS = """
the a an of to in on at by for with and or not is are was be it this that which what where who how why when
object objects shape shapes image picture photo scene segment find show mark mask masks candidate candidates region
red green blue yellow purple orange white black grey gray brown pink colour color bright dark light
circle square triangle ellipse star hexagon diamond bar rectangle line round thin long small large big
largest smallest biggest thinnest most least area left right top bottom above below behind front next near
closest nearest farthest leftmost rightmost topmost lowest middle center centre between inside outside same
different first then second other one two three four five six seven eight nine ten yes no true false score
answer question think reasoning because so if would could should use used you your we our us they their
tool open bottle stand reach things need store access helpful person people animal dog cat car chair table cup
does do did has have had can will may might must get give take make look see hold carry sit eat drink cut
highlighted outlined numbered shown drawn dimmed box point points json number numbers rank best match matches
Is the highlighted region the object the question asks for? Answer Yes or No. The answer is
You are a helpful assistant. user assistant system
"""


def _corpus() -> list[str]:
    words = _CORPUS_WORDS.split()
    lines = [_CORPUS_WORDS]
    # Sentences and capitalised forms so frequent words become single tokens; digits and JSON punctuation too.
    for i, w in enumerate(words):
        nxt = words[(i * 7 + 3) % len(words)]
        lines.append(f"{w} {nxt}. {w.capitalize()} {nxt}? The {w} is {nxt}, not {w}.")
    lines += [
        " ".join(str(n) for n in range(100)),
        '{"score": 0.5, "scores": [1, 2, 3], "box": [10, 20, 30, 40]}',
    ]
    lines += ["Yes", "No", " Yes", " No", "Yes.", "No."] * 50
    return lines * 4


def build_tokenizer(vocab_size: int = 1024, named_tokens: dict[str, str] | None = None):
    """A Qwen2 byte-level BPE tokenizer trained on the built-in corpus, plus the Qwen2-VL special tokens and any
    family-specific ``named_tokens`` (e.g. ``{"context_image_token": "<IMG_CONTEXT>"}``: added as special tokens
    and exposed as the tokenizer attributes the family's processor reads)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab = state["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        **(named_tokens or {}),
    )
    extra = [t for t in QWEN2VL_SPECIAL_TOKENS if t != "<|endoftext|>"] + list((named_tokens or {}).values())
    tok.add_special_tokens({"additional_special_tokens": extra})
    tok.add_special_tokens({"pad_token": "<|endoftext|>"})
    tok.chat_template = QWEN2VL_CHAT_TEMPLATE
    return tok


def _qwen_text_config(ids: dict, vocab_size: int, initializer_range: float, **extra) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        initializer_range=initializer_range,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=True,
        **extra,
    )


def _qwen_family_parts(
    family: str, ids: dict, vocab_size: int, initializer_range: float, tok, min_pixels: int, max_pixels: int
):
    """(config, model class, processor with ``tok``) of a tiny Qwen-family preset."""
    import transformers as tf

    # mrope_section: the rotary halves (head_dim 64 -> 32) split over (time, height, width).
    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]}
    tokens = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    text = _qwen_text_config(ids, vocab_size, initializer_range, rope_parameters=rope)
    # The vision towers of Qwen2.5-VL and Qwen3-VL at tiny width (2x2 merge into the 128-wide text model).
    vision = dict(
        depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128, spatial_merge_size=2,
        temporal_patch_size=2, initializer_range=initializer_range,
    )  # fmt: skip
    if family == "qwen2-vl":
        config = tf.Qwen2VLConfig(
            text_config=text,
            vision_config=dict(
                depth=2,
                embed_dim=64,
                hidden_size=128,
                num_heads=2,
                mlp_ratio=2,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                in_channels=3,
                initializer_range=initializer_range,
            ),  # fmt: skip
            **tokens,
        )
        parts = (tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLProcessor, tf.Qwen2VLVideoProcessor, 14)
        template = QWEN2VL_CHAT_TEMPLATE
    elif family == "qwen2.5-vl":
        config = tf.Qwen2_5_VLConfig(
            text_config=text,
            vision_config=dict(vision, patch_size=14, window_size=112, fullatt_block_indexes=[1]),
            **tokens,
        )
        parts = (tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLProcessor, tf.Qwen2VLVideoProcessor, 14)
        template = QWEN2VL_CHAT_TEMPLATE
    elif family == "qwen3-vl":
        text.update(head_dim=64, rope_parameters={**rope, "rope_theta": 5000000.0, "mrope_interleaved": True})
        config = tf.Qwen3VLConfig(
            text_config=text,
            vision_config=dict(
                vision, patch_size=16, num_position_embeddings=576, deepstack_visual_indexes=[1]
            ),
            **tokens,
        )
        parts = (tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLProcessor, tf.Qwen3VLVideoProcessor, 16)
        template = QWEN3VL_CHAT_TEMPLATE
    else:
        raise ValueError(f"no tiny builder for family {family!r}")
    model_cls, processor_cls, video_cls, patch = parts
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    pixels = dict(size=size, patch_size=patch, merge_size=2, min_pixels=min_pixels, max_pixels=max_pixels)
    tok.chat_template = template
    processor = processor_cls(
        image_processor=tf.Qwen2VLImageProcessor(**pixels), tokenizer=tok, video_processor=video_cls(**pixels),
        chat_template=template,
    )  # fmt: skip
    return config, model_cls, processor


def _other_family_parts(family: str, ids: dict, vocab_size: int, initializer_range: float, tok):
    """(config, model class, processor) of the InternVL3 and LLaVA-OneVision tiny presets (Qwen2 language models)."""
    import transformers as tf

    text = dict(model_type="qwen2", **_qwen_text_config(ids, vocab_size, initializer_range))
    if family == "internvl3":
        size, patch = 224, 14
        seq = (size // patch // 2) ** 2  # tokens per tile after the 2x2 pixel shuffle
        config = tf.InternVLConfig(
            vision_config=dict(
                hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                image_size=[size, size], patch_size=[patch, patch], initializer_range=initializer_range,
            ),
            text_config=text, image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=seq,
            tie_word_embeddings=True,
        )  # fmt: skip
        # Dynamic tiling as InternVL3 does it (tiles, then a thumbnail of the whole image), at most 4 tiles here.
        image_processor = tf.GotOcr2ImageProcessor(
            size={"height": size, "width": size}, crop_to_patches=True, min_patches=1, max_patches=4,
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
        )  # fmt: skip
        processor = tf.InternVLProcessor(
            image_processor=image_processor, tokenizer=tok, image_seq_length=seq, chat_template=INTERNVL_CHAT_TEMPLATE,
            video_processor=tf.InternVLVideoProcessor(size={"height": size, "width": size}),
        )  # fmt: skip
        return config, tf.InternVLForConditionalGeneration, processor
    if family == "llava-onevision":
        size, patch = 112, 14
        image_token = tok.convert_tokens_to_ids("<image>")
        config = tf.LlavaOnevisionConfig(
            vision_config=dict(
                model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, image_size=size, patch_size=patch,
            ),
            text_config=text, image_token_index=image_token, video_token_index=tok.convert_tokens_to_ids("<video>"),
            vision_feature_select_strategy="full", vision_feature_layer=-1,
            image_grid_pinpoints=[[size, size], [size, 2 * size], [2 * size, size], [2 * size, 2 * size]],
            tie_word_embeddings=True,
        )  # fmt: skip
        image_processor = tf.LlavaOnevisionImageProcessor(
            size={"height": size, "width": size}, image_grid_pinpoints=config.image_grid_pinpoints,
            image_mean=[0.5] * 3, image_std=[0.5] * 3,
        )  # fmt: skip
        processor = tf.LlavaOnevisionProcessor(
            image_processor=image_processor, tokenizer=tok, num_image_tokens=(size // patch) ** 2,
            vision_feature_select_strategy="full", chat_template=LLAVA_OV_CHAT_TEMPLATE,
            video_processor=tf.LlavaOnevisionVideoProcessor(size={"height": size, "width": size}),
        )  # fmt: skip
        return config, tf.LlavaOnevisionForConditionalGeneration, processor
    raise ValueError(f"no tiny builder for family {family!r}")


def build_tiny_vlm(
    output: str | Path,
    family: str = "qwen2-vl",
    seed: int = 0,
    initializer_range: float = 0.3,
    min_pixels: int = 56 * 56,
    max_pixels: int = 336 * 336,
) -> Path:
    """Write a random-init tiny VLM of ``family`` (model, tokenizer, processor, chat template) to ``output``."""
    out = Path(output)
    named = {"internvl3": INTERNVL_TOKENS, "llava-onevision": LLAVA_OV_TOKENS}.get(family)
    tok = build_tokenizer(named_tokens=named)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIAL_TOKENS}
    vocab_size = ((len(tok) + 63) // 64) * 64
    if named:
        config, model_cls, processor = _other_family_parts(family, ids, vocab_size, initializer_range, tok)
        tok.chat_template = processor.chat_template
    else:
        config, model_cls, processor = _qwen_family_parts(
            family, ids, vocab_size, initializer_range, tok, min_pixels, max_pixels
        )
    config.architectures = [model_cls.__name__]
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    out.mkdir(parents=True, exist_ok=True)
    save_vlm(model, out)
    processor.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": ids["<|endoftext|>"],
                "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                "pad_token_id": ids["<|endoftext|>"],
                "do_sample": False,
            },
            indent=2,
        )
    )
    return out


def build_tiny_sam(output: str | Path, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    cfg = sam_config("tiny")
    torch.manual_seed(seed)
    sam = build_sam(cfg)
    save_file({k: v.contiguous() for k, v in sam.state_dict().items()}, str(out / "model.safetensors"))
    (out / "sam_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def build_tiny_models(
    output: str | Path, seed: int = 0, force: bool = False, names: list[str] | None = None
) -> dict[str, Path]:
    """Build every tiny preset (or ``names``) under ``output/<name>``; existing complete ones are kept unless force.

    Each model is written to a temporary folder and renamed into place, so a crash never leaves half a model.
    """
    root = Path(output)
    root.mkdir(parents=True, exist_ok=True)
    from .mask_decoders import TINY_MASK_DECODERS, build_tiny_mask_decoder

    wanted = names or [*TINY_VLM_PRESETS, *TINY_SAM_PRESETS, *TINY_MASK_DECODERS]
    built: dict[str, Path] = {}
    for name in wanted:
        dest = root / name
        if (dest / ".complete").exists() and not force:
            built[name] = dest
            continue
        with building(dest, "ok") as tmp:
            if name in TINY_VLM_PRESETS:
                build_tiny_vlm(tmp, seed=seed, **TINY_VLM_PRESETS[name])
            elif name in TINY_SAM_PRESETS:
                build_tiny_sam(tmp, seed=seed)
            elif name in TINY_MASK_DECODERS:
                build_tiny_mask_decoder(tmp, TINY_MASK_DECODERS[name], seed=seed)
            else:
                raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(wanted)}")
        built[name] = dest
    return built
