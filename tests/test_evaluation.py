"""Generation batching: prompts built on demand, batches cut by count and by a KV-cache token budget."""

from __future__ import annotations

import pytest
import torch

from pipeline.evaluation import GenerationPrompts, generation_batches
from pipeline.prompts import Segment


def prompts_of(lengths: list[int]) -> list[Segment]:
    return [Segment(torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool)) for n in lengths]


def sizes(batches) -> list[list[int]]:
    return [[len(p.input_ids) for p in b] for b in batches]


def test_batches_keep_order_and_respect_count_and_token_budget():
    lengths = [10, 12, 30, 8, 8, 8, 50, 9]
    assert sizes(generation_batches(prompts_of(lengths), 3, 0, 1)) == [[10, 12, 30], [8, 8, 8], [50, 9]]
    # budget 60 padded tokens x beams: [10, 12] pads to 2 x 12 = 24; adding 30 would pad to 3 x 30 = 90 > 60
    got = sizes(generation_batches(prompts_of(lengths), 8, 60, 1))
    assert got == [[10, 12], [30, 8], [8, 8], [50], [9]]
    for batch in got:
        assert len(batch) == 1 or max(batch) * len(batch) <= 60
    with_beams = sizes(generation_batches(prompts_of(lengths), 8, 60, 3))  # 3 beams: each row counts 3 times
    assert with_beams == [[10], [12], [30], [8, 8], [8], [50], [9]]
    assert [n for b in with_beams for n in b] == lengths


class CountingBuilder:
    """Stands in for PromptBuilder.generation: records which prompts were built, and when."""

    def __init__(self):
        self.built: list[int] = []

    def generation(self, demos, query):
        self.built.append(query)
        return prompts_of([query])[0]


def test_prompts_are_built_only_when_their_batch_is_reached():
    builder = CountingBuilder()
    prompts = GenerationPrompts(builder, [[]] * 6, [5, 6, 7, 8, 9, 10])
    batches = generation_batches(prompts, 2, 0, 1)
    assert builder.built == []
    first = next(batches)
    assert sizes([first]) == [[5, 6]] and builder.built == [5, 6, 7]  # the next prompt opens the next batch
    assert sizes(batches) == [[7, 8], [9, 10]]
    assert len(prompts) == 6 and sizes([prompts[1:3]]) == [[6, 7]]


def test_a_table_of_vqa_answers_scores_with_vqa_accuracy_when_asked():
    # exact match against any reference gives 100 for an answer only one of ten annotators gave
    from pipeline.data import Item
    from pipeline.errors import MimicError
    from pipeline.evaluation import score, scored_as

    item = Item("q1", (), "what colour?", ("red",) + ("blue",) * 9)
    assert score(scored_as({"kind": "table"}), [item], ["red"]).value == 100.0
    vqa = scored_as({"kind": "table", "metric": "vqa_accuracy"})
    assert vqa == "vqa" and score(vqa, [item], ["red"]).value == pytest.approx(30.0)
    assert score(vqa, [item], ["red"]).value == score("vqa", [item], ["red"]).value
    assert (
        scored_as({"kind": "vqa"}) == "vqa"
        and scored_as({"kind": "table", "metric": "cider_d"}) == "coco_karpathy"
    )
    with pytest.raises(MimicError, match="data.eval.metric='bleu': choose one of exact_match"):
        scored_as({"kind": "table", "metric": "bleu"})


def test_only_a_table_takes_a_metric(tmp_path):
    from pipeline.data import DataSource, load_items
    from pipeline.errors import MimicError

    with pytest.raises(MimicError, match="metric is for tables only"):
        load_items(DataSource("embedded", task="color", split="support", n=4, seed=0, metric="vqa_accuracy"))
