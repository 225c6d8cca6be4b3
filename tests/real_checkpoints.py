"""Tiny checkpoints of every supported family with real tokenizer and processor classes, and a VQAv2 fixture.

Unlike the word-level tokenizer of conftest.py, the tokenizers here are the real classes with BPE merges
learned in code: `Qwen2Tokenizer` (GPT-2 byte-level, newline "Ċ") for the Qwen2-based families and
`LlamaTokenizer` (Metaspace with byte fallback, newline "<0x0A>") for Idefics (Llama) and Idefics2 (Mistral).
Common words are single tokens, so "... Short answer: " tokenized apart from "red\\n" gives ids that one call
on the whole text never gives. `save_tiny_checkpoint` writes model and processor with `save_pretrained`.

AutoProcessor.from_pretrained of a saved directory (transformers 5.24, no torchvision): it loads for
idefics, idefics2 and llava; it raises ImportError for llava_onevision, qwen2_vl and qwen2_5_vl, whose
processors always build a video processor that needs torchvision (OSError "Can't load video processor"
instead if the directory lacks preprocessor_config.json). `load_processor` builds those from their image
processor and tokenizer (AutoImageProcessor, AutoTokenizer) instead. AutoTokenizer gives the llava
checkpoint a plain TokenizersBackend (5.24 ignores tokenizer_class for model_type "llava"), the others
their Qwen2Tokenizer / LlamaTokenizer.
"""

from __future__ import annotations

import functools
import inspect
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as tf
from PIL import Image, ImageDraw
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

FAMILY_NAMES = ("idefics", "idefics2", "llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass(frozen=True)
class FamilySpec:
    """What a prompt of one family looks like with these checkpoints."""

    name: str
    image_placeholder: str  # stands for one image in prompt text (Idefics v1 takes PIL images in a list)
    tokenizer_kind: str  # "bpe" (byte-level, Qwen2Tokenizer) or "metaspace" (LlamaTokenizer)
    newline: str  # the vocabulary entry of "\n"
    auto_processor_loads: bool  # AutoProcessor.from_pretrained works without torchvision


SPECS: dict[str, FamilySpec] = {
    "idefics": FamilySpec("idefics", "<image>", "metaspace", "<0x0A>", True),
    "idefics2": FamilySpec("idefics2", "<image>", "metaspace", "<0x0A>", True),
    "llava": FamilySpec("llava", "<image>", "bpe", "Ċ", True),
    "llava_onevision": FamilySpec("llava_onevision", "<image>", "bpe", "Ċ", False),
    "qwen2_vl": FamilySpec("qwen2_vl", QWEN_IMAGE, "bpe", "Ċ", False),
    "qwen2_5_vl": FamilySpec("qwen2_5_vl", QWEN_IMAGE, "bpe", "Ċ", False),
}

COLORS = {"red": (210, 40, 40), "blue": (40, 60, 210), "green": (40, 170, 60)}  # RGB of the squares
ANSWERS = ("yes", "no", *COLORS, "1", "2", "3", "dog", "cat", "car")
# (question, answer_type): {c} is a colour, the answer follows from the image (see `_answer`)
QUESTIONS = (
    ("What color is it?", "other"),
    ("What color is the square in the middle of the image?", "other"),
    ("Is it {c}?", "yes/no"),
    ("Is the big square in this picture {c}?", "yes/no"),
    ("How many squares?", "number"),
    ("How many squares are there in this picture?", "number"),
)
_EXTRA_TEXT = (  # other prompts users write: the embedded suite, Idefics chat turns
    "What is this? What shape is it? What size is it? Where is it? circle square triangle cross big small",
    "left right yellow User: Assistant: Describe the image. There is a dog and a cat near the car.",
)
IMAGE_SIZES = ((40, 24), (24, 40), (32, 32), (60, 20))  # (width, height) of the fixture's images


def corpus() -> list[str]:
    """Prompt rounds the merges are learned on: every fixture question with every answer, and some chat text."""
    rounds = []
    for question, _ in QUESTIONS:
        for color in COLORS:
            for answer in ANSWERS:
                text = question.format(c=color)
                rounds += [f"Question: {text} Short answer: {answer}\n", f"{text.lower()} {answer}\n"]
    return rounds + [f"{line}\n" for line in _EXTRA_TEXT]


@functools.cache
def _learned(kind: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges BpeTrainer learns on `corpus()` for `kind` ("bpe" or "metaspace")."""
    if kind == "bpe":
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        trainer = trainers.BpeTrainer(
            vocab_size=1024, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        texts = corpus()
    else:
        backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=True)
        specials = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
        trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=specials, show_progress=False)
        # no "\n" in the alphabet: it falls back to <0x0A>; lines with and without the leading "▁" the
        # tokenizer adds at the start of a text, so a line's first word is one piece after "\n" or an image too
        texts = [head + line.rstrip("\n") for line in corpus() for head in ("", " ")]
    backend.train_from_iterator(texts, trainer)
    model = json.loads(backend.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def byte_level_tokenizer(extra: tuple[str, ...]) -> tf.Qwen2Tokenizer:
    """A Qwen2Tokenizer as Qwen2 checkpoints have it: chat specials, then `extra` special tokens, no BOS."""
    vocab, merges = _learned("bpe")
    vocab = dict(vocab)
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra):
        vocab[token] = len(vocab)
    return tf.Qwen2Tokenizer(
        vocab=vocab,
        merges=list(merges),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", *extra],
    )


def metaspace_tokenizer(extra: tuple[str, ...]) -> tf.LlamaTokenizer:
    """A LlamaTokenizer as Llama/Mistral checkpoints have it: <unk> <s> </s>, 256 byte tokens, BPE pieces,
    then `extra` special tokens; it adds BOS, pads with <unk>."""
    vocab, merges = _learned("metaspace")
    tokenizer = tf.LlamaTokenizer(
        vocab=dict(vocab), merges=list(merges), add_bos_token=True, pad_token="<unk>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(extra)})
    return tokenizer


def _without_video(cls: type) -> type:
    """`cls` minus its video processor (whose classes need torchvision), under the real class name, so its
    saved processor_config.json names `cls` and keeps every other __init__ argument."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        cls.__init__(self, image_processor, tokenizer, **kwargs)

    signature = inspect.signature(cls.__init__)
    params = [p for n, p in signature.parameters.items() if n != "video_processor"]
    __init__.__signature__ = signature.replace(parameters=params)
    doc = f"{cls.__name__} without its video processor."
    return type(cls.__name__, (cls,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


VIDEO_FREE_PROCESSORS = {  # family -> its processor class without the video processor
    "llava_onevision": _without_video(tf.LlavaOnevisionProcessor),
    "qwen2_vl": _without_video(tf.Qwen2VLProcessor),
    "qwen2_5_vl": _without_video(tf.Qwen2_5_VLProcessor),
}

PATCH = 4  # vision patch side of every tiny vision tower
# LLaVA-OneVision anyres grids (height, width): the fixture's sizes get 1 + 1, 2 or 3 patches of 16 x 16
PINPOINTS = [[16, 16], [16, 32], [32, 16], [16, 48], [48, 16]]
TEXT_SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
TEXT_SHAPE.update(num_key_value_heads=2)
QWEN_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def processor_for(name: str) -> tf.ProcessorMixin:
    """The in-memory processor of family `name`: real tokenizer, PIL image processor, real processor class."""
    if name == "idefics":
        tokenizer = metaspace_tokenizer(("<fake_token_around_image>", "<image>"))
        return tf.IdeficsProcessor(tf.IdeficsImageProcessorPil(image_size=16), tokenizer, image_size=16)
    if name == "idefics2":
        tokenizer = metaspace_tokenizer(("<fake_token_around_image>", "<image>", "<end_of_utterance>"))
        size = {"longest_edge": 32, "shortest_edge": 16}
        images = tf.Idefics2ImageProcessorPil(do_image_splitting=False, size=size)
        return tf.Idefics2Processor(images, tokenizer, image_seq_len=4)
    if name == "llava":
        images = tf.CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
        kwargs = dict(vision_feature_select_strategy="default", num_additional_image_tokens=1)  # CLS dropped
        return tf.LlavaProcessor(images, byte_level_tokenizer(("<image>",)), patch_size=PATCH, **kwargs)
    if name == "llava_onevision":
        size = {"height": 16, "width": 16}
        images = tf.LlavaOnevisionImageProcessorPil(size=size, image_grid_pinpoints=PINPOINTS)
        tokenizer = byte_level_tokenizer(("<image>", "<video>"))
        kwargs = dict(num_image_tokens=16, vision_feature_select_strategy="full")
        return VIDEO_FREE_PROCESSORS[name](images, tokenizer, **kwargs)
    if name in ("qwen2_vl", "qwen2_5_vl"):
        kwargs = dict(patch_size=PATCH, merge_size=2, temporal_patch_size=2, min_pixels=64, max_pixels=1024)
        images = tf.Qwen2VLImageProcessorPil(**kwargs)
        return VIDEO_FREE_PROCESSORS[name](images, byte_level_tokenizer(QWEN_SPECIALS))
    raise KeyError(f"unknown family {name!r}; known: {FAMILY_NAMES}")


def _text(tok, vocab_size: int, **extra) -> dict:
    """The tiny text-decoder config: hidden 32, 3 layers, 4 heads (2 KV heads), long enough for many images."""
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return dict(vocab_size=vocab_size, max_position_embeddings=4096, **TEXT_SHAPE, **ids, **extra)


def _vision(**extra) -> dict:
    return dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, patch_size=PATCH, **extra)


def _padded(n: int) -> int:
    """Qwen2 checkpoints' embedding is larger than the tokenizer: round up to a multiple of 64."""
    return -(-n // 64) * 64


def _idefics_config(tok) -> tf.IdeficsConfig:
    text = _text(tok, tok.convert_tokens_to_ids("<fake_token_around_image>"))  # added tokens: decoupled rows
    text.update(num_hidden_layers=4)  # a multiple of cross_layer_interval, else forward raises IndexError
    del text["num_key_value_heads"]  # no GQA in Idefics v1
    vision = dict(embed_dim=16, image_size=16, patch_size=PATCH, num_hidden_layers=1, num_attention_heads=2)
    perceiver = dict(resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2, resampler_head_dim=8)
    return tf.IdeficsConfig(
        **text,
        additional_vocab_size=2,
        cross_layer_interval=2,
        alpha_initializer="ones",  # the default zero gates make cross-attention the identity
        use_resampler=True,
        vision_config=dict(intermediate_size=32, **vision),
        perceiver_config=dict(use_resampler=True, **perceiver),
    )


def _idefics2_config(tok) -> tf.Idefics2Config:
    perceiver = dict(resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2, resampler_head_dim=8)
    return tf.Idefics2Config(
        text_config=dict(model_type="mistral", **_text(tok, len(tok))),
        vision_config=_vision(num_hidden_layers=1, image_size=32),
        perceiver_config=dict(hidden_size=32, num_key_value_heads=1, **perceiver),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )


def _llava_config(tok) -> tf.LlavaConfig:
    return tf.LlavaConfig(
        text_config=dict(model_type="qwen2", **_text(tok, _padded(len(tok)))),
        vision_config=dict(model_type="clip_vision_model", num_hidden_layers=2, **_vision(image_size=16)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
    )


def _onevision_config(tok) -> tf.LlavaOnevisionConfig:
    return tf.LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **_text(tok, _padded(len(tok)))),
        vision_config=dict(model_type="siglip_vision_model", num_hidden_layers=2, **_vision(image_size=16)),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )


def _qwen_config(tok, v25: bool) -> tf.PreTrainedConfig:
    ids = dict(
        zip(("vision_start", "vision_end", "image", "video"), tok.convert_tokens_to_ids(QWEN_SPECIALS))
    )
    vision = dict(depth=2, num_heads=2, patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2)
    if v25:  # windows of 16 pixels: block 0 attends within windows, block 1 to the whole image
        vision.update(hidden_size=16, intermediate_size=32, out_hidden_size=32, fullatt_block_indexes=[1])
        vision.update(window_size=16)
    else:
        vision.update(embed_dim=16, hidden_size=32)
    mrope = dict(rope_scaling=dict(type="mrope", mrope_section=[1, 1, 2]))
    return (tf.Qwen2_5_VLConfig if v25 else tf.Qwen2VLConfig)(
        text_config=_text(tok, _padded(len(tok)), **mrope),
        vision_config=vision,
        image_token_id=ids["image"],
        video_token_id=ids["video"],
        vision_start_token_id=ids["vision_start"],
        vision_end_token_id=ids["vision_end"],
    )


MODELS = {  # family -> (model class, config builder from the tokenizer)
    "idefics": (tf.IdeficsForVisionText2Text, _idefics_config),
    "idefics2": (tf.Idefics2ForConditionalGeneration, _idefics2_config),
    "llava": (tf.LlavaForConditionalGeneration, _llava_config),
    "llava_onevision": (tf.LlavaOnevisionForConditionalGeneration, _onevision_config),
    "qwen2_vl": (tf.Qwen2VLForConditionalGeneration, functools.partial(_qwen_config, v25=False)),
    "qwen2_5_vl": (tf.Qwen2_5_VLForConditionalGeneration, functools.partial(_qwen_config, v25=True)),
}


def build_model(name: str, processor, seed: int = 0) -> torch.nn.Module:
    """A tiny randomly initialised model of family `name` whose ids match `processor`'s tokenizer; eval mode.

    A perceiver initialised with std 0.02 averages its image context away (Idefics2's start as ones); its
    matrices and latents are redrawn (std 0.2 and 1) so that images change the logits as in trained checkpoints.
    """
    model_class, config_for = MODELS[name]
    tok = processor.tokenizer
    torch.manual_seed(seed)
    model = model_class(config_for(tok))
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "connector" in key or "perceiver_resampler" in key:
                if key.endswith("latents"):
                    param.normal_()
                elif param.dim() >= 2:
                    param.normal_(0.0, 0.2)
    if tok.bos_token:  # Llama/Mistral: <s> ... </s>; Qwen2: no BOS, generation ends on <|im_end|> or EOT
        special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    else:
        eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id]
        special = dict(bos_token_id=tok.pad_token_id, eos_token_id=eos)
    model.generation_config = tf.GenerationConfig(pad_token_id=tok.pad_token_id, **special)
    return model.eval()


def save_tiny_checkpoint(name: str, directory: Path) -> Path:
    """Build family `name`'s tiny model (seed 0) and processor and `save_pretrained` both into `directory`.

    Besides what 5.24 writes (processor_config.json nests the image processor), the image processor is saved
    on its own as preprocessor_config.json, as checkpoints on the Hub have it.
    """
    directory = Path(directory)
    processor = processor_for(name)
    model = build_model(name, processor)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    processor.image_processor.save_pretrained(directory)
    return directory


def load_processor(name: str, directory: Path) -> tf.ProcessorMixin:
    """The processor saved in `directory`: AutoProcessor where it loads, else image processor + tokenizer."""
    if SPECS[name].auto_processor_loads:
        return tf.AutoProcessor.from_pretrained(directory, local_files_only=True)
    images = tf.AutoImageProcessor.from_pretrained(directory, local_files_only=True)
    tokenizer = tf.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    kwargs = json.loads((Path(directory) / "processor_config.json").read_text())
    for key in ("processor_class", "image_processor", "tokenizer", "video_processor"):
        kwargs.pop(key, None)
    return VIDEO_FREE_PROCESSORS[name](images, tokenizer, **kwargs)


def load_model(directory: Path) -> torch.nn.Module:
    """The saved model, as a user loads it: AutoConfig + AutoModelForImageTextToText, local files only."""
    config = tf.AutoConfig.from_pretrained(directory, local_files_only=True)
    model = tf.AutoModelForImageTextToText.from_pretrained(directory, config=config, local_files_only=True)
    return model.eval()


def processor_inputs(name: str, processor, prompts: list[list]) -> dict[str, torch.Tensor]:
    """One processor call on a batch of prompts, each a list of text pieces and PIL images in order.

    Idefics v1 takes the lists as they are (each image becomes <fake><image><fake> in place); the others get
    the family's placeholder for each image and the images nested per prompt (LLaVA-OneVision then treats a
    prompt of several images as multi-image: base features only, no anyres patches).
    """
    if name == "idefics":
        return dict(processor(text=prompts, add_end_of_utterance_token=False, return_tensors="pt"))
    placeholder = SPECS[name].image_placeholder
    texts = ["".join(p if isinstance(p, str) else placeholder for p in prompt) for prompt in prompts]
    images = [[p for p in prompt if not isinstance(p, str)] for prompt in prompts]
    return dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))


def fixture_image(color: str, squares: int, size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A grey canvas of `size` (width, height) with `squares` squares of `color`, placed at random."""
    rng = random.Random(seed)
    image = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(image)
    side = min(size) // 3
    for _ in range(squares):
        x, y = rng.randrange(size[0] - side), rng.randrange(size[1] - side)
        draw.rectangle((x, y, x + side, y + side), fill=COLORS[color])
    return image


def _answer(answer_type: str, color: str, squares: int, asked: str) -> str:
    """The right answer about an image of `squares` squares of `color`; `asked` is the colour a yes/no names."""
    if answer_type == "other":
        return color
    if answer_type == "yes/no":
        return "yes" if asked == color else "no"
    return str(squares)


def write_vqa_fixture(root: Path, n_questions: int = 24, subtype: str = "train2014", seed: int = 0) -> dict:
    """Write a VQAv2-layout split under `root` (questions, annotations, COCO-named JPEGs of four sizes, three
    questions per image) and return the `data.train` / `data.eval` mapping of kind "vqa" for it."""
    root, rng = Path(root), random.Random(seed)
    image_dir = root / subtype
    image_dir.mkdir(parents=True, exist_ok=True)
    questions, annotations = [], []
    for i in range(n_questions):
        n_image = i // 3
        image_id = 1000 + 100_000 * seed + 7 * n_image  # splits of other seeds share no ids
        color, squares = list(COLORS)[n_image % 3], 1 + (n_image * 5) % 3
        path = image_dir / f"COCO_{subtype}_{image_id:012d}.jpg"
        if not path.exists():
            size = IMAGE_SIZES[n_image % len(IMAGE_SIZES)]
            fixture_image(color, squares, size, seed=seed + n_image).save(path, quality=90)
        template, answer_type = QUESTIONS[(i + n_image) % len(QUESTIONS)]
        asked = rng.choice(list(COLORS))
        question, question_id = template.format(c=asked), image_id * 10 + i % 3
        answer = _answer(answer_type, color, squares, asked)
        others = [rng.choice(ANSWERS) for _ in range(2)]
        answers = [
            {"answer": a, "answer_confidence": "yes" if a == answer else "maybe", "answer_id": j + 1}
            for j, a in enumerate([answer] * 8 + others)
        ]
        questions.append({"image_id": image_id, "question": question, "question_id": question_id})
        annotation = dict(
            question_id=question_id, image_id=image_id, answer_type=answer_type, answers=answers
        )
        question_type = " ".join(template.lower().split()[:3])
        annotations.append({**annotation, "question_type": question_type, "multiple_choice_answer": answer})
    info = {"description": "tiny VQAv2-layout fixture", "version": "2.0", "year": 2017}
    license_ = {
        "name": "Creative Commons Attribution 4.0 License",
        "url": "http://creativecommons.org/licenses/by/4.0/",
    }
    questions_json = root / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
    annotations_json = root / f"v2_mscoco_{subtype}_annotations.json"
    head = {"info": info, "data_type": "mscoco", "data_subtype": subtype, "license": license_}
    questions_doc = {**head, "task_type": "Open-Ended", "questions": questions}
    annotations_doc = {**head, "annotations": annotations}
    questions_json.write_text(json.dumps(questions_doc))
    annotations_json.write_text(json.dumps(annotations_doc))
    paths = dict(questions_json=questions_json, annotations_json=annotations_json, image_dir=image_dir)
    return {"kind": "vqa", **{key: str(path) for key, path in paths.items()}}
