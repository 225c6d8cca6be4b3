"""The gradient loop every gradient-trained method shares: AdamW with warmup and cosine decay, gradient
accumulation and clipping, mixed precision on GPU, gradients all-reduced across ranks, one log row per batch."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from transformers import get_cosine_schedule_with_warmup

from pipeline.config import TrainConfig
from pipeline.distributed import World, reduce_gradients, reduce_sum
from pipeline.errors import MimicError
from pipeline.training import autocast_for

# (this rank's rows of a batch, their cached targets, the whole batch's counts) -> [loss, ce, align, kl]
LossFn = Callable[[Sequence[int], object, tuple[int, int]], list[torch.Tensor]]


class Trainer:
    def __init__(
        self, method, lr: float, weight_decay: float, tr: TrainConfig, device: str, batches_per_epoch: int
    ):
        self.method, self.tr = method, tr
        total = math.ceil(batches_per_epoch / tr.grad_accum) * tr.epochs
        self.optimizer = torch.optim.AdamW(method.trainable(), lr=lr, weight_decay=weight_decay)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, int(tr.warmup * total), total)
        self.autocast = autocast_for(device, tr.precision)
        self.scaler = torch.amp.GradScaler("cuda", enabled=tr.precision == "fp16")

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),  # fp16's loss scale: a resumed run goes on with it
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def epoch(
        self,
        epoch: int,
        batches: Sequence[Sequence[int]],
        parts: Sequence[Sequence[int]],
        targets: Iterable,
        counts: Callable[[Sequence[int]], tuple[int, int]],
        loss: LossFn,
        here: World,
        rows: list[dict],
        progress: Callable[[dict], None],
    ) -> None:
        """One epoch: every batch's loss over the whole batch's counts (this rank computes its part), an
        optimizer step every grad_accum batches; appends one row per batch to `rows`."""
        with torch.random.fork_rng(devices=[]):
            # stochastic parts of a method (LoRA dropout) draw from torch's global generator: seeded per epoch and
            # rank, a resumed run draws what an uninterrupted one draws
            torch.manual_seed(self.tr.seed * 1_000_003 + epoch * 1_009 + here.rank)
            self._epoch(epoch, batches, parts, targets, counts, loss, here, rows, progress)

    def _epoch(self, epoch, batches, parts, targets, counts, loss, here, rows, progress) -> None:
        tr, params = self.tr, self.method.trainable
        for i, (indices, part, target) in enumerate(zip(batches, parts, targets)):
            values = torch.zeros(4)  # this rank's share of (loss, ce, align, kl): the shares add up
            if part:
                with self.autocast():
                    terms = loss(part, target, counts(indices))
                self.scaler.scale(terms[0] / tr.grad_accum).backward()
                values = torch.stack(terms).detach().float().cpu()
            loss_value, ce_value, align_value, kl_value = reduce_sum(values, here).tolist()
            if not math.isfinite(loss_value):  # the checkpoint of the last finished epoch stays as it was
                raise MimicError(
                    f"the training loss became {loss_value} at step {len(rows)} (epoch {epoch + 1}): lower "
                    f"methods.{tr.method}.lr (now {self.optimizer.defaults['lr']})"
                )
            if (i + 1) % tr.grad_accum == 0 or i + 1 == len(batches):
                reduce_gradients(params(), here)
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(params(), tr.clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
            row = {
                "step": len(rows),
                "epoch": epoch,
                "loss": loss_value,
                "ce": ce_value,
                "align": align_value,
            }
            rows.append({**row, "kl": kl_value, "lr": self.optimizer.param_groups[0]["lr"]})
            progress(rows[-1])
