"""Forward a batch and gather per-layer states at each sequence's last tokens (its query+answer segment)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pipeline.families import ModelView
from pipeline.sites import record_last_token, record_sites

MODEL_KEYS_SKIP = ("answer_mask",)


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The collated batch minus our bookkeeping keys, on `device`."""
    return {k: v.to(device) for k, v in batch.items() if k not in MODEL_KEYS_SKIP}


def padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """position_ids [B, T] that start at 0 at each row's first real token, as `generate` computes them: a
    left-padded row gets the positions it has alone (MimIC's w . q sees q after RoPE, so they matter)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def forward_inputs(view: ModelView, batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """`model_inputs` plus position_ids where the family's model does not derive them from the mask."""
    inputs = model_inputs(batch, device)
    if view.family.position_ids:
        inputs["position_ids"] = padded_positions(inputs["attention_mask"])
    return inputs


@dataclass
class QueryStates:
    """For each sequence of a batch: states [L, n_i, hidden] and (optionally) the top-k log-probabilities and their
    token ids at the positions predicting its answer tokens ([A_i, k] each)."""

    states: list[torch.Tensor]
    topk_values: list[torch.Tensor] | None
    topk_indices: list[torch.Tensor] | None
    last_hidden: torch.Tensor | None = None  # [B, L, hidden]: every layer's output at the last prompt token
    last_heads: torch.Tensor | None = (
        None  # [B, L, heads x head_dim]: the heads' outputs (o_proj input) there
    )


def last_tokens(tensor: torch.Tensor, lengths: Sequence[int]) -> list[torch.Tensor]:
    """Row i's last lengths[i] positions of a left-padded [B, T, ...] tensor (the query+answer tokens)."""
    return [tensor[i, tensor.shape[1] - n :] for i, n in enumerate(lengths)]


def forward_query_states(
    model: torch.nn.Module,
    view: ModelView,
    batch: dict[str, torch.Tensor],
    lengths: Sequence[int],
    site: str,
    layers: Sequence[int],
    topk: int = 0,
    all_logits: bool = True,
    kept: Sequence[torch.Tensor] | None = None,
    last_token: bool = False,
) -> tuple[QueryStates, torch.Tensor]:
    """Run the model once, recording `site` in `layers`; returns the gathered states and the logits [B, T, V].

    With ``all_logits=False`` (the teacher) the LM head runs only where top-k logits are kept, on the last
    max(lengths) positions, or on the last position when topk is 0 (transformers' ``logits_to_keep``): the
    [B, T, vocab] logits of k-shot prompts are the teacher's largest activation on real models.
    `kept` ([n_i] bool per row, None = all) selects the recorded positions among each row's last lengths[i].
    `last_token` also records every layer's output and heads' outputs at the query's last prompt token.
    Gradients flow if enabled by the caller (the student); the teacher calls this under torch.no_grad().
    """
    device = next(model.parameters()).device
    longest = max(lengths)
    keep = 0 if all_logits else (longest if topk else 1)
    positions = last_prompt_positions(batch["answer_mask"], lengths)
    last = record_last_token(view, positions) if last_token else contextlib.nullcontext({})
    with record_sites(view, site, layers) as recorded, last as at_last:
        # use_cache=False: no generation follows, so no per-layer K/V cache is built and kept alive
        logits = model(
            **forward_inputs(view, batch, device), logits_to_keep=keep, use_cache=False
        ).logits  # (B, T|keep, V)
    # copy only the query+answer span, not the demonstrations
    stacked = torch.stack([recorded[layer][:, -longest:] for layer in layers], 1)  # (B, L, n_max, hidden)
    states = [
        s.transpose(0, 1) for s in last_tokens(stacked.transpose(1, 2), lengths)
    ]  # each (L, n_i, hidden)
    if kept is not None:
        states = [s[:, k.to(s.device)] for s, k in zip(states, kept)]  # each (L, kept_i, hidden)
    values = indices = None
    if topk:
        mask = batch["answer_mask"].to(device).clone()
        for row, n in enumerate(lengths):  # only the query's answer, not the demonstrations' answers
            mask[row, : mask.shape[1] - n] = False
        # the logit predicting answer token t sits one position earlier
        predicting = torch.zeros_like(mask)
        predicting[:, :-1] = mask[:, 1:]
        predicting = predicting[:, mask.shape[1] - logits.shape[1] :]  # the positions whose logits were kept
        # log-probabilities, not raw logits: with them the tail's mass 1 - sum(exp) is known, and a KL over the
        # top-k plus one tail bucket is exact (pipeline.training.topk_kl)
        top = torch.log_softmax(logits.float(), -1).topk(topk, dim=-1)
        values = [top.values[i][predicting[i]] for i in range(len(lengths))]
        indices = [top.indices[i][predicting[i]] for i in range(len(lengths))]
    got = QueryStates(states, values, indices)
    if last_token:
        got.last_hidden = torch.stack(at_last["hidden"], 1)  # (B, L, hidden)
        got.last_heads = torch.stack(at_last["heads"], 1)  # (B, L, heads x head_dim)
    return got, logits


def last_prompt_positions(answer_mask: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """[B] index of each row's last prompt token: the one before the query's first answer token (a row's query
    round is its last lengths[i] positions; its answer tokens are the round's last True of answer_mask)."""
    t = answer_mask.shape[1]
    out = []
    for row, n in enumerate(lengths):
        answers = answer_mask[row, t - n :].nonzero()
        out.append(t - n + int(answers[0]) - 1 if len(answers) else t - 1)
    return torch.tensor(out)
