"""Few-shot prompts assembled from token segments.

A round (demonstration or query) is `template.round` with the family's image placeholder, e.g.
"<image>Question: what is this? Short answer: red\n". Each round is tokenized ONCE, in one call on its whole
text (so the ids are those a real tokenizer gives the text, never a split no one-call tokenization produces), and
the teacher and student inputs are concatenations of those same segments:

    teacher = [bos] + demo_1 + ... + demo_k + query_answer      student = [bos] + query_answer

so the query+answer positions line up by construction: they are the last `len(query_answer)` tokens of both.
Rounds start with an image placeholder (a special token), so joining them equals one call on the joined text.

The answer tokens of a round are those past the round's prompt, the text before `{answer}` without its trailing
spaces: byte-level BPE and SentencePiece vocabularies fold the space into the answer's first token ("Ġred",
"▁red"), and a generation prompt that ended in a lone space token would be one no training text contains.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from pipeline.errors import MimicError
from pipeline.families import Family

log = logging.getLogger(__name__)
TEXT_KEYS = ("input_ids", "attention_mask")
# Processor outputs aligned with input_ids ([1, t], 0 = text), e.g. Qwen2-VL's mm_token_type_ids, which its M-RoPE
# needs: joined along the token axis like input_ids, never along the image axis.
TOKEN_KEYS = ("mm_token_type_ids",)


@dataclass(frozen=True)
class PromptTemplate:
    """One round of a prompt; `{image}`, `{question}` and `{answer}` are filled in, `{answer}` comes last."""

    round: str = "{image}Question: {question} Short answer: {answer}\n"

    def __post_init__(self):
        for name in ("{image}", "{question}", "{answer}"):
            if name not in self.round:
                raise MimicError(f"prompt template {self.round!r} lacks the field {name}")
        if self.round.index("{answer}") < self.round.index("{question}"):
            raise MimicError(f"prompt template {self.round!r}: {{answer}} must come after {{question}}")

    def prefix(self, family: Family, question: str, num_images: int = 1) -> str:
        """The round up to its answer, without trailing spaces: what a model sees before it answers."""
        head = self.round[: self.round.index("{answer}")]
        text = head.replace("{image}", family.image_placeholder * num_images).replace("{question}", question)
        return text.rstrip(" ")

    def text(self, family: Family, question: str, answer: str, num_images: int = 1) -> str:
        """The whole round: a demonstration, or a training query with its answer."""
        at = self.round.index("{answer}")
        head = self.round[:at].replace("{image}", family.image_placeholder * num_images)
        return head.replace("{question}", question) + self.round[at:].replace("{answer}", answer)


@dataclass
class Segment:
    """One tokenized round: ids [t], which of them are answer tokens [t], its image tensors and per-token types."""

    input_ids: torch.Tensor
    answer_mask: torch.Tensor
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    token_types: dict[str, torch.Tensor] = field(default_factory=dict)

    def token_type(self, key: str) -> torch.Tensor:
        """`token_types[key]` [t], or all text (zeros) for a segment without it (BOS, a round without images)."""
        return self.token_types.get(key, torch.zeros(len(self.input_ids), dtype=torch.long))


def encode_round(
    processor, family: Family, template: PromptTemplate, question: str, images: Sequence, answer: str | None
) -> Segment:
    """Tokenize one round in one call: with its answer (a demonstration, a training query), or only its prompt
    (answer None: a generation prompt). The answer tokens are the round's last ones."""
    if answer is not None and not answer.strip():
        raise MimicError(f"empty answer for question {question!r}: a round needs an answer to show")
    # A special token before the round: its first word is tokenized as it is inside a prompt (after the
    # previous round or BOS), not as the start of a text (SentencePiece prepends "▁" there), then dropped.
    lead = _lead_token(processor.tokenizer)
    prompt = template.prefix(family, question, len(images))
    text = prompt if answer is None else template.text(family, question, answer, len(images))
    encoded = _encode(processor, family, lead + text, images)
    ids = encoded["input_ids"][0].long()
    if ids[0].item() != processor.tokenizer.convert_tokens_to_ids(lead):
        raise MimicError(f"the processor does not keep the special token {lead!r} at the start of a text")
    ids = ids[1:]
    n = 0 if answer is None else _answer_length(processor.tokenizer, lead + prompt, lead + text, ids, answer)
    mask = torch.zeros(len(ids), dtype=torch.bool)
    mask[len(ids) - n :] = True
    skip = TEXT_KEYS + TOKEN_KEYS
    image_tensors = {k: v for k, v in encoded.items() if k not in skip and isinstance(v, torch.Tensor)}
    types = {k: encoded[k][0, 1:].long() for k in TOKEN_KEYS if k in encoded}
    return Segment(ids, mask, image_tensors, types)


def _lead_token(tokenizer) -> str:
    for token in (tokenizer.bos_token, tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token):
        if token:
            return str(token)
    raise MimicError("the tokenizer has no BOS, pad, EOS or unknown token to tokenize rounds after")


def _encode(processor, family: Family, text: str, images: Sequence) -> dict:
    """input_ids [1, t] and image tensors of one round, as the family's processor makes them."""
    if (
        family.encode == "tokenizer"
    ):  # placeholders are already the tokens; images through the image processor
        out = {
            "input_ids": processor.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        }
        if images:
            pixels = processor.image_processor(list(images), return_tensors="pt")
            pixels = pixels["pixel_values"] if isinstance(pixels, Mapping) else pixels  # (n, 3, H, W)
            out["pixel_values"] = pixels[None]  # (1, n, 3, H, W)
        return out
    kwargs = {"images": list(images)} if images else {}
    return processor(text=[text], add_special_tokens=False, return_tensors="pt", **kwargs)


def _answer_length(tokenizer, prompt: str, text: str, ids: torch.Tensor, answer: str) -> int:
    """How many of the round's last tokens are its answer: the tokens `text` has beyond `prompt`.
    Image placeholders count as the single tokens they are in the tokenizer; the processor's expansion of them
    sits before the answer and does not change its tokens."""
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(whole) - len(head)
    if whole[: len(head)] != head:
        raise MimicError(
            f"the tokenizer joins the end of the prompt {prompt[-24:]!r} with the answer {answer!r} into one "
            "token; end the template's text before {answer} with a space or a newline"
        )
    if n <= 0 or ids[len(ids) - n :].tolist() != whole[len(whole) - n :]:
        raise MimicError(f"the answer {answer!r} after {prompt[-24:]!r} gives no tokens of its own")
    return n


def bos_segment(processor) -> Segment:
    """The BOS token as a segment, or an empty one for tokenizers without BOS."""
    bos = processor.tokenizer.bos_token_id
    ids = torch.tensor([] if bos is None else [bos], dtype=torch.long)
    return Segment(ids, torch.zeros(len(ids), dtype=torch.bool))


def join_images(parts: Sequence[torch.Tensor], axis: int) -> torch.Tensor:
    """Concatenate image tensors along `axis`, zero-padding every later axis to its largest size, as processors
    pad a batch: pixels at the bottom and right (with a pixel mask of 0 there), patches and images at the end."""
    later = [max(p.shape[d] for p in parts) for d in range(axis + 1, parts[0].dim())]
    padded = []
    for part in parts:
        if list(part.shape[axis + 1 :]) != later:
            full = part.new_zeros(*part.shape[: axis + 1], *later)
            full[(slice(None),) * (axis + 1) + tuple(slice(0, n) for n in part.shape[axis + 1 :])] = part
            part = full
        padded.append(part)
    return torch.cat(padded, axis)


def assemble(segments: Sequence[Segment], family: Family, max_length: int | None = None) -> Segment:
    """Concatenate segments into one sequence; image tensors are joined along the family's image axis."""
    ids = torch.cat([s.input_ids for s in segments])
    if max_length is not None and len(ids) > max_length:
        raise MimicError(
            f"prompt of {len(ids)} tokens exceeds the model's limit of {max_length}: lower k or shorten the template"
        )
    images: dict[str, list[torch.Tensor]] = {}
    for segment in segments:
        for key, value in segment.images.items():
            images.setdefault(key, []).append(value)
    joined = {k: join_images(v, family.image_axis) for k, v in images.items()}
    types = {
        k: torch.cat([s.token_type(k) for s in segments])
        for k in {k for s in segments for k in s.token_types}
    }
    return Segment(ids, torch.cat([s.answer_mask for s in segments]), joined, types)


def image_attention_mask(
    input_ids: torch.Tensor, image_token_id: int, num_images: int, eos_token_id: int | None = None
) -> torch.Tensor:
    """Idefics v1's [B, T, images] mask, as its processor computes it for a whole prompt: each token sees the
    most recent image at or before it; tokens before the first image, and tokens after an EOS until the next
    image, see none. A function of the (left-padded) ids, so it is rebuilt on every assembled batch."""
    t = input_ids.shape[1]
    positions = torch.arange(t).expand_as(input_ids)
    is_image = input_ids == image_token_id
    latest = is_image.long().cumsum(-1) - 1  # (B, T), -1 = no image yet
    last_image = torch.where(is_image, positions, -1).cummax(-1).values  # (B, T)
    sees = latest >= 0
    if eos_token_id is not None:  # an EOS at or after the last image, strictly before the token, blinds it
        is_eos = torch.zeros_like(is_image)
        is_eos[:, 1:] = input_ids[:, :-1] == eos_token_id
        last_eos = torch.where(is_eos, positions - 1, -1).cummax(-1).values  # latest EOS before each token
        sees &= last_image > last_eos
    seen = torch.nn.functional.one_hot(latest.clamp_min(0), max(num_images, 1))  # (B, T, images)
    return seen * sees[..., None]


def collate(
    sequences: Sequence[Segment],
    family: Family,
    pad_id: int,
    image_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> dict[str, torch.Tensor]:
    """A left-padded batch: input_ids and attention_mask [B, T], answer_mask [B, T], image tensors joined (and
    padded) as the family's processor batches them; Idefics v1's image_attention_mask from the ids."""
    longest = max(len(s.input_ids) for s in sequences)
    batch = len(sequences)
    ids = torch.full((batch, longest), pad_id, dtype=torch.long)
    attention = torch.zeros(batch, longest, dtype=torch.long)
    answers = torch.zeros(batch, longest, dtype=torch.bool)
    for row, seq in enumerate(sequences):
        n = len(seq.input_ids)
        ids[row, longest - n :] = seq.input_ids
        attention[row, longest - n :] = 1
        answers[row, longest - n :] = seq.answer_mask
    out = {"input_ids": ids, "attention_mask": attention, "answer_mask": answers}
    for key in {k for s in sequences for k in s.token_types}:
        out[key] = torch.zeros(batch, longest, dtype=torch.long)  # padding counts as text
        for row, seq in enumerate(sequences):
            out[key][row, longest - len(seq.input_ids) :] = seq.token_type(key)
    for key in {k for s in sequences for k in s.images}:
        # a flat list over the batch (axis 0), or per-sample lists [1, n_i, ...] padded to the most images
        out[key] = join_images([s.images[key] for s in sequences if key in s.images], 0)
    if family.image_attention_mask:
        if image_token_id is None:
            raise ValueError(f"{family.name} batches need the image token id")
        count = out["pixel_values"].shape[1] if "pixel_values" in out else 1
        out["image_attention_mask"] = image_attention_mask(ids, image_token_id, count, eos_token_id)
    return out


class PromptBuilder:
    """Teacher, student and generation inputs for items. Each round's tokens are kept for the life of the
    builder (a few KiB), its image tensors only for the `image_cache` most recent rounds (a 640 x 480 image is
    7-29 MiB of tensors in Qwen2-VL or Idefics2 with splitting), so memory does not grow with the data; a round
    whose images were dropped is encoded again when next used."""

    def __init__(
        self,
        processor,
        family: Family,
        template: PromptTemplate,
        max_length: int | None = None,
        image_cache: int = 32,
    ):
        self.processor, self.family, self.template, self.max_length = processor, family, template, max_length
        if not (template.round.startswith("{image}") or template.round[-1].isspace()):
            log.warning(
                "prompt template %r neither starts with {image} nor ends with a space or newline: the end of one "
                "round and the start of the next may tokenize as one word in the whole prompt, not as joined here",
                template.round,
            )
        self._bos = bos_segment(processor)
        self._tokens: dict[tuple[str, bool], Segment] = {}  # rounds without their image tensors
        self._images: OrderedDict[tuple[str, bool], dict[str, torch.Tensor]] = OrderedDict()
        self.image_cache = image_cache
        self._lock = threading.Lock()  # the two caches, when threads build prompts ahead
        tokenizer = processor.tokenizer
        self.pad_id = 0 if tokenizer.pad_token_id is None else tokenizer.pad_token_id
        self.image_token_id = (
            tokenizer.convert_tokens_to_ids("<image>") if family.image_attention_mask else None
        )
        self.eos_id = tokenizer.eos_token_id

    @classmethod
    def for_model(cls, loaded, template: str) -> PromptBuilder:
        """The builder every stage uses: the loaded model's processor and family, its position limit."""
        view = loaded.view
        limit = getattr(view.text_config, "max_position_embeddings", None)
        return cls(loaded.processor, view.family, PromptTemplate(template), limit)

    def collate(self, segments: Sequence[Segment]) -> dict[str, torch.Tensor]:
        """A left-padded batch of `segments` with this tokenizer's pad id."""
        return collate(segments, self.family, self.pad_id, self.image_token_id, self.eos_id)

    def round(self, item, with_answer: bool = True) -> Segment:
        """One item's round, with its answer (a demonstration or training query) or without (for generation).
        Safe to call from several threads (pipeline/prefetch.py): the caches are locked, the encoding is not."""
        key = (item.id, with_answer)
        with self._lock:
            tokens = self._tokens.get(key)
            if tokens is not None and key in self._images:
                self._images.move_to_end(key)
                return replace(tokens, images=self._images[key])
        segment = self._encode(item, with_answer)
        with self._lock:
            self._tokens.setdefault(key, replace(segment, images={}))
            if self.image_cache > 0:
                self._images[key] = segment.images
                self._images.move_to_end(key)
                if len(self._images) > self.image_cache:
                    self._images.popitem(last=False)
        return segment

    def tokens(self, item, with_answer: bool = True) -> Segment:
        """The round's tokens without image tensors: token counts for every item without holding its images."""
        key = (item.id, with_answer)
        if key not in self._tokens:
            self.round(item, with_answer)
        return self._tokens[key]

    def _encode(self, item, with_answer: bool) -> Segment:
        from pipeline.data import load_image
        from pipeline.splits import target_answer

        images = [load_image(image) for image in item.images]
        answer = target_answer(item) if with_answer else None
        return encode_round(self.processor, self.family, self.template, item.question, images, answer)

    def teacher(self, demos: Sequence, query) -> Segment:
        """[bos] + demonstrations + query with its answer; the query+answer tokens come last."""
        return assemble(
            [self._bos, *(self.round(d) for d in demos), self.round(query)], self.family, self.max_length
        )

    def student(self, query) -> Segment:
        """[bos] + query with its answer: the same last tokens as `teacher`."""
        return assemble([self._bos, self.round(query)], self.family, self.max_length)

    def generation(self, demos: Sequence, query) -> Segment:
        """[bos] + demonstrations + the query up to its answer, for generation."""
        rounds = [self.round(d) for d in demos] + [self.round(query, with_answer=False)]
        return assemble([self._bos, *rounds], self.family, self.max_length)
