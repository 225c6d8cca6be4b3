"""Shared fixtures: tiny configs of the real transformers classes of every supported family, built in code."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers as tf
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

TEXT = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
IMAGE_TOKEN = 5
MROPE = dict(rope_scaling=dict(type="mrope", mrope_section=[1, 1, 2]))
VISION = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, image_size=16, patch_size=4)
QWEN_VISION = dict(
    depth=1, num_heads=2, in_channels=3, patch_size=2, spatial_merge_size=2, temporal_patch_size=2
)


def word_level_tokenizer(special: list[str], words: list[str], **tokens) -> tf.PreTrainedTokenizerFast:
    """A lower-casing whitespace WordLevel tokenizer: ids are special + words in order, "\\n" kept as a token;
    `tokens` are PreTrainedTokenizerFast's (bos_token=..., extra_special_tokens=...)."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(special + words)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    backend.add_tokens([AddedToken("\n", normalized=False)])
    return tf.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **tokens)


def _idefics2():
    return tf.Idefics2ForConditionalGeneration(
        tf.Idefics2Config(
            text_config=dict(model_type="mistral", **TEXT),
            vision_config=dict(num_hidden_layers=1, **VISION),
            perceiver_config=dict(
                hidden_size=32,
                resampler_n_latents=4,
                resampler_depth=1,
                resampler_n_heads=2,
                resampler_head_dim=8,
                num_key_value_heads=1,
            ),
            image_token_id=IMAGE_TOKEN,
        )
    )


def _idefics():
    text = {k: v for k, v in TEXT.items() if k != "num_key_value_heads"}
    return tf.IdeficsForVisionText2Text(
        tf.IdeficsConfig(
            **text,
            cross_layer_interval=1,
            vision_config=dict(
                embed_dim=16,
                image_size=16,
                patch_size=4,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
            ),
            perceiver_config=dict(use_resampler=False),
            additional_vocab_size=2,
        )
    )


def _llava_onevision():
    return tf.LlavaOnevisionForConditionalGeneration(
        tf.LlavaOnevisionConfig(
            text_config=dict(model_type="qwen2", **TEXT),
            vision_config=dict(model_type="siglip_vision_model", num_hidden_layers=2, **VISION),
            image_token_index=IMAGE_TOKEN,
        )
    )


def _llava():
    return tf.LlavaForConditionalGeneration(
        tf.LlavaConfig(
            text_config=dict(model_type="qwen2", **TEXT),
            vision_config=dict(model_type="clip_vision_model", num_hidden_layers=2, **VISION),
            image_token_index=IMAGE_TOKEN,
        )
    )


def _qwen2_vl():
    return tf.Qwen2VLForConditionalGeneration(
        tf.Qwen2VLConfig(
            text_config=dict(**TEXT, **MROPE),
            vision_config=dict(embed_dim=16, hidden_size=32, **QWEN_VISION),
            image_token_id=IMAGE_TOKEN,
            video_token_id=6,
            vision_start_token_id=7,
        )
    )


def _qwen2_5_vl():
    return tf.Qwen2_5_VLForConditionalGeneration(
        tf.Qwen2_5_VLConfig(
            text_config=dict(**TEXT, **MROPE),
            vision_config=dict(
                hidden_size=16,
                intermediate_size=32,
                out_hidden_size=32,
                fullatt_block_indexes=[0],
                **QWEN_VISION,
            ),
            image_token_id=IMAGE_TOKEN,
            video_token_id=6,
            vision_start_token_id=7,
        )
    )


BUILDERS = {
    "idefics2": _idefics2,
    "idefics": _idefics,
    "llava_onevision": _llava_onevision,
    "llava": _llava,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
}


def build_tiny(name: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A tiny, randomly initialised model of family `name`, in eval mode, SDPA attention, frozen."""
    torch.manual_seed(seed)
    model = BUILDERS[name]().to(dtype).eval()
    model.set_attn_implementation("sdpa")
    model.requires_grad_(False)
    return model


def left_padded_batch(seed: int = 0, lengths: tuple[int, ...] = (12, 9, 6), vocab: int = 96):
    """input_ids and attention_mask [B, T], left-padded, with token ids clear of the special ones."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    ids = torch.randint(10, vocab, (len(lengths), t), generator=g)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, t - n :] = 1
        ids[i, : t - n] = 0
    return ids, mask


@pytest.fixture(params=list(BUILDERS))
def family_name(request) -> str:
    return request.param


def extra_inputs(name: str, input_ids: torch.Tensor, seed: int = 0) -> dict:
    """Inputs a family needs beyond text: Idefics v1 always cross-attends to images (one per sample here)."""
    if name != "idefics":
        return {}
    g = torch.Generator().manual_seed(seed)
    b, t = input_ids.shape
    return {
        "pixel_values": torch.randn(b, 1, 3, 16, 16, generator=g),
        "image_attention_mask": torch.ones(b, t, 1, dtype=torch.long),
    }


ROOT = Path(__file__).resolve().parents[1]
# Small runs of the stages on the embedded default: seconds each on 2 cores.
SMALL = [
    "data.train={kind: embedded, task: color, split: support, n: 64, seed: 0}",
    "data.eval={kind: embedded, task: color, split: query, n: 24, seed: 0}",
    "data.n_support=40",
    "data.n_train=24",
    "data.n_eval=24",
    "data.n_val=0",
    "extract.batch_size=8",
    "train.epochs=2",
    "train.batch_size=8",
    "evaluate.batch_size=24",
]


def cli(*args, cwd=None, check=False, timeout=300):
    """Run `mimic ...` as a real subprocess; returns the CompletedProcess."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "stages.cli", *map(str, args)]
    result = subprocess.run(command, cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result


def overrides(*extra: str) -> list[str]:
    """SMALL plus `extra` as CLI `-s` arguments."""
    return [a for o in (*SMALL, *extra) for a in ("-s", o)]
