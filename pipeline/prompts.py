"""Few-shot prompts assembled from token segments.

A round (demonstration or query) is `template.round` with the family's image placeholder, e.g.
"<image>Question: what is this ? Short answer: red\\n". Each round is tokenized ONCE, as its prefix (image +
question, through the processor) followed by its answer part (through the tokenizer), and the teacher and student
inputs are concatenations of those same segments:

    teacher = [bos] + demo_1 + ... + demo_k + query_answer      student = [bos] + query_answer

so the query+answer positions line up by construction: they are the last `len(query_answer)` tokens of both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from pipeline.errors import MimicError
from pipeline.families import Family

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
        """The round up to the answer: what a model sees before it answers."""
        head = self.round[: self.round.index("{answer}")]
        return head.replace("{image}", family.image_placeholder * num_images).replace("{question}", question)

    def answer_part(self, answer: str) -> str:
        """The rest of the round: the answer and whatever the template puts after it."""
        return self.round[self.round.index("{answer}") :].replace("{answer}", answer)


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
    """Tokenize one round: prefix with its images through the processor, then the answer part (if any)."""
    prefix = template.prefix(family, question, len(images))
    kwargs = {"images": list(images)} if images else {}
    encoded = processor(text=[prefix], add_special_tokens=False, return_tensors="pt", **kwargs)
    ids = encoded["input_ids"][0]
    skip = TEXT_KEYS + TOKEN_KEYS
    image_tensors = {k: v for k, v in encoded.items() if k not in skip and isinstance(v, torch.Tensor)}
    answer_ids = torch.empty(0, dtype=ids.dtype)
    if answer is not None:
        answer_ids = torch.tensor(
            processor.tokenizer(template.answer_part(answer), add_special_tokens=False)["input_ids"],
            dtype=ids.dtype,
        )
    mask = torch.cat([torch.zeros(len(ids), dtype=torch.bool), torch.ones(len(answer_ids), dtype=torch.bool)])
    types = {
        k: torch.cat([encoded[k][0].long(), torch.zeros(len(answer_ids), dtype=torch.long)])
        for k in TOKEN_KEYS
        if k in encoded
    }
    return Segment(torch.cat([ids, answer_ids]), mask, image_tensors, types)


def bos_segment(processor) -> Segment:
    """The BOS token as a segment, or an empty one for tokenizers without BOS."""
    bos = processor.tokenizer.bos_token_id
    ids = torch.tensor([] if bos is None else [bos], dtype=torch.long)
    return Segment(ids, torch.zeros(len(ids), dtype=torch.bool))


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
    axis = family.image_axis
    joined = {k: torch.cat(v, dim=axis) for k, v in images.items()}
    types = {
        k: torch.cat([s.token_type(k) for s in segments])
        for k in {k for s in segments for k in s.token_types}
    }
    return Segment(ids, torch.cat([s.answer_mask for s in segments]), joined, types)


def collate(sequences: Sequence[Segment], family: Family, pad_id: int) -> dict[str, torch.Tensor]:
    """A left-padded batch: input_ids and attention_mask [B, T], answer_mask [B, T], image tensors joined."""
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
    keys = {k for s in sequences for k in s.images}
    for key in keys:
        parts = [s.images[key] for s in sequences if key in s.images]
        if family.image_axis == 0:
            out[key] = torch.cat(parts, 0)
        else:  # per-sample image lists [1, n_i, ...]: pad every sample to the most images with zeros
            most = max(p.shape[1] for p in parts)
            padded = [
                torch.cat([p, p.new_zeros(p.shape[0], most - p.shape[1], *p.shape[2:])], 1) for p in parts
            ]
            out[key] = torch.cat(padded, 0)
    return out


class PromptBuilder:
    """Teacher, student and generation inputs for items, each round tokenized once and cached by item id."""

    def __init__(self, processor, family: Family, template: PromptTemplate, max_length: int | None = None):
        if not family.segment_prompts:
            raise MimicError(
                f"{family.name} prompts cannot be assembled from token segments yet: its processor adds BOS on every "
                "call and ties tokens to images with an image_attention_mask (docs/method.md, Known gaps)"
            )
        self.processor, self.family, self.template, self.max_length = processor, family, template, max_length
        self._bos = bos_segment(processor)
        self._rounds: dict[tuple[str, bool], Segment] = {}

    def round(self, item, with_answer: bool = True) -> Segment:
        from pipeline.data import load_image
        from pipeline.splits import target_answer

        key = (item.id, with_answer)
        if key not in self._rounds:
            images = [load_image(image) for image in item.images]
            answer = target_answer(item) if with_answer else None
            self._rounds[key] = encode_round(
                self.processor, self.family, self.template, item.question, images, answer
            )
        return self._rounds[key]

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
