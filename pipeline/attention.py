"""Scaled dot-product attention that also returns its log-sum-exp, differentiable through both outputs.

MimIC needs `log Z2 = logsumexp_j(q . k_j * scale)` over the keys each query attends to, and its exact gradient:
a layer's shift changes the queries and keys of every later layer, and through them those layers' `mu`.

Fused path (CPU, float64/float32/bfloat16/float16): one call of the flash-attention CPU kernel gives both the
output and the log-sum-exp, and ONE call of its backward kernel gives the exact gradient of both. The trick:
the kernel's backward computes `dS = P * (dO V^T - D)` with `D_i = dO_i . O_i`. The gradient of `lse_i` with
respect to `S_ij` is `P_ij`, so an upstream `g_i` on `lse` only changes `D_i` into `D_i - g_i`. Appending one
column to every operand — 0 to q, k and v (scores and values unchanged), 1 to dO and `-g` to O — makes the
kernel compute exactly that `D - g`, with no score matrix materialized.

Fallback (any other device): a materialized `softmax` / `logsumexp` with plain autograd: exact but O(T x S)
memory per head. Tests force it to compare both paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
FUSED_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _pad_width(head_dim: int) -> int:
    """Columns appended for the backward trick: at least one, rounded to a multiple of 8 (the kernel's
    vectorized width; 65 columns measured ~20% slower than 72 on 2 cores)."""
    return 8 - head_dim % 8 if head_dim % 8 else 8


class _FlashWithLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal: bool, scale: float):
        out, lse = _flash_cpu(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)  # (B,H,T,D), (B,H,T)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, mask = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if grad_lse is None:
            grad_lse = torch.zeros_like(lse)
        d = q.shape[-1]
        width = _pad_width(d)
        extra_o = torch.zeros(*out.shape[:-1], width, dtype=out.dtype, device=out.device)
        extra_do = torch.zeros_like(extra_o)
        extra_o[..., 0] = -grad_lse.to(out.dtype)  # rowsum(dO * O) becomes D - g
        extra_do[..., 0] = 1.0
        dq, dk, dv = _flash_cpu_backward(
            torch.cat([grad_out.contiguous(), extra_do], -1),
            F.pad(q, (0, width)),
            F.pad(k, (0, width)),
            F.pad(v, (0, width)),
            torch.cat([out, extra_o], -1),
            lse,
            0.0,
            ctx.is_causal,
            attn_mask=mask,
            scale=ctx.scale,
        )
        return dq[..., :d], dk[..., :d], dv[..., :d], None, None, None


def _materialized(q, k, v, mask, is_causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores, log-sum-exp and softmax in float32 (float64 stays float64) whatever the input dtype: MimIC's mu
    reads the log-sum-exp, which bf16 arithmetic would move by percents; the output is cast back."""
    dtype = q.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v = q.to(work), k.to(work), v.to(work)
    scores = (q @ k.transpose(-1, -2)) * scale  # (B,H,T,S)
    if is_causal:
        t, s = scores.shape[-2:]
        keep = torch.ones(t, s, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores + mask.to(work)
    # A fully masked row (a left-padding query) gets output 0 and lse 0, as the fused kernel gives it.
    empty = torch.isneginf(scores).all(-1, keepdim=True)  # (B,H,T,1)
    scores = scores.masked_fill(empty, 0.0)
    lse = torch.logsumexp(scores, -1).masked_fill(empty[..., 0], 0.0)  # (B,H,T)
    probs = torch.softmax(scores, -1).masked_fill(empty, 0.0)
    return (probs @ v).to(dtype), lse  # lse stays float32 (float64), as the fused kernels give it


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    scale: float,
    fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output [B, H, T, D] and log-sum-exp [B, H, T] of the masked scaled scores.

    q, k, v: [B, H, T|S, D] with KV heads already expanded; mask: additive float [B, 1|H, T, S] or None;
    is_causal: top-left causal rule (as SDPA's flag). fused=None picks the fused kernel where it serves.
    """
    if fused is None:
        fused = q.device.type == "cpu" and q.dtype in FUSED_DTYPES
    if fused:
        dtype = q.dtype
        if dtype in (torch.bfloat16, torch.float16):
            # the CPU kernel rounds its half-precision scores (lse off by ~6e-5 from float64 math on the same
            # inputs, measured): run it in float32, so log Z2 and mu are float32 statistics, and cast the output
            q, k, v = q.float(), k.float(), v.float()
            mask = None if mask is None else mask.float()
        if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
            out, lse = _flash_cpu(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)  # no autograd node
        else:
            out, lse = _FlashWithLSE.apply(q, k, v, mask, is_causal, scale)
        return out.to(dtype), lse
    return _materialized(q, k, v, mask, is_causal, scale)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean keep-mask (True = attend) as the additive float mask the fused kernel takes."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
