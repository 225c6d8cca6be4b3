"""The tiny LLaVA built in code: word-level tokenizer, PIL image processor, processor and model.

It is a real `LlavaForConditionalGeneration` (CLIP vision tower, Qwen2 text model, as in LLaVA-interleave
on Qwen2), so it travels the code paths of real checkpoints: `from_pretrained`, the processor's expansion
of `<image>` into IMAGE_TOKENS placeholder tokens, `generate`.

Tokenizer facts the prompt builder relies on: words and punctuation are separate tokens (lower-cased),
"\\n" is a token of its own and is the EOS (the answer terminator), "<s>" is the BOS and is never added by
the tokenizer or the processor: a few-shot input is `[bos] + round_1 + ... + round_n`.
"""

from __future__ import annotations

import torch
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from pipeline.embedded.tasks import ATTRIBUTES, EXPLICIT_QUESTIONS, IMAGE_SIZE

PATCH_SIZE = 4  # pixels per side of a vision patch
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 16: the CLS token is dropped ("default" strategy)
VOCAB_SIZE = 64  # the word list below padded to a round number

PAD, UNK, BOS, IMAGE, EOS = "<pad>", "<unk>", "<s>", "<image>", "\n"
_TEMPLATE_WORDS = ("question", "short", "answer", ":", "what", "is", "this", "?", "it")


def vocabulary() -> list[str]:
    """Every token in id order: special tokens, template and question words, then answer words."""
    words = [PAD, UNK, BOS, IMAGE, EOS, *_TEMPLATE_WORDS]
    sentences = " ".join(EXPLICIT_QUESTIONS.values()).lower().replace("?", " ? ").split()
    answers = [value for values in ATTRIBUTES.values() for value in values]
    for word in [*sentences, *answers]:
        if word not in words:
            words.append(word)
    if len(words) > VOCAB_SIZE:
        raise ValueError(f"{len(words)} words exceed VOCAB_SIZE={VOCAB_SIZE} in pipeline/embedded/model.py")
    return words


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer: lower-case, split on whitespace and punctuation, "\\n" kept as a token."""
    vocab = {word: index for index, word in enumerate(vocabulary())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # Added tokens are matched before pre-tokenization, so "<image>Question" and "red\n" split right.
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (PAD, UNK, BOS, IMAGE)]
    )
    backend.add_tokens([AddedToken(EOS, special=False, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )


def build_image_processor() -> CLIPImageProcessorPil:
    """CLIP preprocessing at IMAGE_SIZE: resize the short side, centre-crop, rescale, CLIP mean/std."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )


def build_processor() -> LlavaProcessor:
    """The LlavaProcessor that expands each "<image>" into IMAGE_TOKENS placeholder tokens."""
    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, removed again by the "default" strategy
        image_token=IMAGE,
    )


def build_config() -> LlavaConfig:
    """The tiny LLaVA config: 2-layer CLIP vision tower (16x16 px, 4 px patches), 4-layer Qwen2 (GQA)."""
    token_id = {word: index for index, word in enumerate(vocabulary())}
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        projection_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    text = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=96,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,  # RoPE has no table: longer prompts (k = 32 benchmarks) only need the limit
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=token_id[BOS],
        eos_token_id=token_id[EOS],
        pad_token_id=token_id[PAD],
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=token_id[IMAGE],
        image_seq_length=IMAGE_TOKENS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )


def build_model(seed: int) -> LlavaForConditionalGeneration:
    """A freshly initialised tiny LLaVA (float32); `seed` fixes the initial weights."""
    config = build_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    text = config.text_config
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id,
        do_sample=False,
        max_new_tokens=4,
    )
    return model
