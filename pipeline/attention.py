"""Scaled dot-product attention that also returns its log-sum-exp, differentiable through both outputs.

MimIC needs `log Z2 = logsumexp_j(q . k_j * scale)` over the keys each query attends to, and its exact gradient:
a layer's shift changes the queries and keys of every later layer, and through them those layers' `mu`.

The trick both fused paths share: a fused backward kernel computes `dS = P * (dO V^T - D)` with
`D_i = dO_i . O_i` read from the `dO` and `O` it is given. The gradient of `lse_i` with respect to `S_ij` is
`P_ij`, so an upstream `g_i` on `lse` only changes `D_i` into `D_i - g_i`. Appending columns to every operand —
0 to q, k and v (scores and values unchanged), 1 then 0s to dO and `-g` then 0s to O — makes the kernel compute
exactly that `D - g` in ONE backward call, with no score matrix materialized.

CPU (float64/float32/bfloat16/float16): the flash-attention CPU kernel; half inputs run it in float32.

CUDA (float32/bfloat16/float16, head_dim a multiple of 8 for half, 4 for float32): the memory-efficient kernel,
the only CUDA kernel taking an additive mask and giving lse. Its lse comes padded to a multiple of 32 with +inf
(sliced for use, passed padded to the backward); the mask goes in as a bias of q's dtype with aligned strides.
Before its first use per (device, dtype, head_dim) a self-check runs small cases (causal, left padding, a
decoding step) through it and through the materialized path and compares out, lse and the q/k/v gradients; on
disagreement (or if the kernel raises) it logs one warning and that key uses the materialized path from then
on. The kernel's contract was read from the torch sources, never run here: the self-check is the safety net.

Materialized (any other device, the CUDA fallback, `fused=False`): `softmax` / `logsumexp` in float32 with plain
autograd: exact but O(T x S) memory per head. Tests force it to compare the paths.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from pipeline.errors import one_line

log = logging.getLogger(__name__)

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
# Read at call time: tests put CPU implementations of the kernel's contract in their place.
_efficient_forward = torch.ops.aten._scaled_dot_product_efficient_attention
_efficient_backward = torch.ops.aten._scaled_dot_product_efficient_attention_backward
FUSED_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
EFFICIENT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Self-check: the largest error of out, lse, dq, dk, dv, each relative to that tensor's largest magnitude, against
# float32 math on the same rounded inputs. Kernel rounding stays within a few epsilon of the dtype (bf16 7.8e-3,
# fp16 9.8e-4; fp32 allows TF32 products); a broken contract (lse convention, the column trick) is off by ~1e-1.
SELF_CHECK_TOLERANCE = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}
# (device, dtype, head_dim) -> whether the CUDA kernel passed its self-check there
_VERDICTS: dict[tuple[str, torch.dtype, int], bool] = {}


def _pad_width(head_dim: int) -> int:
    """Columns appended for the backward trick on CPU: at least one, rounded to a multiple of 8 (the kernel's
    vectorized width; 65 columns measured ~20% slower than 72 on 2 cores)."""
    return 8 - head_dim % 8 if head_dim % 8 else 8


def _alignment(dtype: torch.dtype) -> int:
    """The CUDA kernel's alignment (elements) of head_dim and of the bias strides."""
    return 4 if dtype == torch.float32 else 8


def _lse_columns(out: torch.Tensor, grad_out: torch.Tensor, grad_lse: torch.Tensor, width: int):
    """dO and O with `width` columns appended: 1 to dO and -g to O in the first, so rowsum(dO * O) is D - g."""
    extra_o = out.new_zeros(*out.shape[:-1], width)
    extra_do = torch.zeros_like(extra_o)
    extra_o[..., 0] = -grad_lse.to(out.dtype)
    extra_do[..., 0] = 1.0
    return torch.cat([grad_out, extra_do], -1), torch.cat([out, extra_o], -1)


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
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
        grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
        d = q.shape[-1]
        width = _pad_width(d)
        grad_out, out = _lse_columns(out, grad_out, grad_lse, width)
        pad = (0, width)
        dq, dk, dv = _flash_cpu_backward(
            grad_out,
            F.pad(q, pad),
            F.pad(k, pad),
            F.pad(v, pad),
            out,
            lse,
            0.0,
            ctx.is_causal,
            attn_mask=mask,
            scale=ctx.scale,
        )
        return dq[..., :d], dk[..., :d], dv[..., :d], None, None, None


def _cpu_attention(q, k, v, mask, is_causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
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


def _aligned(x: torch.Tensor, align: int) -> bool:
    """The CUDA kernel's layout rule for its operands: last-dim stride 1; the other strides and the start
    offset multiples of `align` elements (an expanded dimension has stride 0, which is one)."""
    rest = (*x.stride()[:-1], x.storage_offset())
    return x.stride(-1) == 1 and all(s % align == 0 for s in rest)


def _kernel_bias(mask: torch.Tensor, q: torch.Tensor, keys: int) -> torch.Tensor:
    """The additive mask [B, 1|H, T|1, S] as the CUDA kernel's bias: q's dtype, [B, H, T, S], aligned to 8
    elements in every dtype (as torch's own SDPA prepares it for this kernel; fp32 would need only 4); copied
    into rows padded to that only where its own layout is not aligned."""
    b, h, t, _ = q.shape
    align = 8
    mask = mask.to(q.dtype)
    view = mask.expand(b, h, t, keys)
    if _aligned(view, align):
        return view
    padded = mask.new_empty(*mask.shape[:-1], -(-keys // align) * align)  # (B,1|H,T|1,S rounded up)
    padded[..., :keys] = mask
    return padded[..., :keys].expand(b, h, t, keys)


def _empty_rows(mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor | None:
    """[B, 1|H, T|1] True where a query sees no key (left-padding rows), or None where every row sees one (no
    mask: key 0 is always visible under the top-left causal rule)."""
    if mask is None:
        return None
    blocked = torch.isneginf(mask)  # (B,1|H,T|1,S)
    if is_causal:
        t, s = blocked.shape[-2], blocked.shape[-1]
        blocked = blocked | ~torch.ones(t, s, dtype=torch.bool, device=mask.device).tril()
    return blocked.all(-1)


def _efficient_call(q, k, v, bias, empty, is_causal: bool, scale: float):
    """The kernel's forward; rows that see no key get output 0 and lse 0 (as `_materialized`), whatever the
    torch version's kernel writes there (recent ones: lse 0; older ones may leave -inf or NaN)."""
    out, lse, seed, offset = _efficient_forward(q, k, v, bias, True, 0.0, is_causal, scale=scale)
    if empty is not None:  # lse (B,H,ceil(T/32)*32): the +inf tail stays for the backward
        t = q.shape[-2]
        out = out.masked_fill(empty[..., None], 0.0)
        lse = torch.cat([lse[..., :t].masked_fill(empty, 0.0), lse[..., t:]], -1)
    return out, lse, seed, offset


class _EfficientWithLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, empty, is_causal: bool, scale: float):
        out, lse, seed, offset = _efficient_call(q, k, v, bias, empty, is_causal, scale)
        ctx.save_for_backward(q, k, v, bias, out, lse, seed, offset)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out, lse[..., : q.shape[-2]]

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, bias, out, lse, seed, offset = ctx.saved_tensors
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
        grad_lse = torch.zeros(out.shape[:-1], device=out.device) if grad_lse is None else grad_lse
        d = q.shape[-1]
        width = _alignment(q.dtype)  # head_dim + width keeps the kernel's alignment
        grad_out, out = _lse_columns(out, grad_out, grad_lse, width)
        pad = (0, width)
        dq, dk, dv, _ = _efficient_backward(
            grad_out,
            F.pad(q, pad),
            F.pad(k, pad),
            F.pad(v, pad),
            bias,
            out,
            lse,  # padded, as the forward wrote it
            seed,
            offset,
            0.0,
            [True, True, True, False],
            ctx.is_causal,
            scale=ctx.scale,  # not the default 1/sqrt(head_dim + width)
        )
        return dq[..., :d], dk[..., :d], dv[..., :d], None, None, None, None


def _efficient_attention(q, k, v, mask, is_causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    align = _alignment(q.dtype)
    q, k, v = (x if _aligned(x, align) else x.contiguous() for x in (q, k, v))
    bias = None if mask is None else _kernel_bias(mask, q, k.shape[-2])
    empty = _empty_rows(mask, is_causal)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _EfficientWithLSE.apply(q, k, v, bias, empty, is_causal, scale)
    out, lse, _, _ = _efficient_call(q, k, v, bias, empty, is_causal, scale)  # no autograd node
    return out, lse[..., : q.shape[-2]]


def _on_efficient_device(x: torch.Tensor) -> bool:
    """Whether the CUDA memory-efficient kernel is the fused path for x's device (tests substitute this)."""
    return x.device.type == "cuda"


def _efficient_unsupported(q, k, v, mask) -> str | None:
    """Why the CUDA kernel cannot take these inputs, or None if it can."""
    if q.dtype not in EFFICIENT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} (it takes {', '.join(map(str, EFFICIENT_DTYPES))})"
    if q.dim() != 4 or k.shape[:2] != q.shape[:2] or v.shape[:-1] != k.shape[:-1]:
        return f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (KV heads must be expanded)"
    align = _alignment(q.dtype)
    if q.shape[-1] % align or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        return f"head_dim {q.shape[-1]} (a multiple of {align} for {q.dtype}, the same for q, k and v)"
    if mask is not None and mask.dim() != 4:
        return f"mask of {mask.dim()} dimensions (it takes [B, 1|H, T, S])"
    return None


def _efficient_verified(q: torch.Tensor) -> bool:
    """The self-check's verdict for q's (device, dtype, head_dim), run on first use."""
    key = (str(q.device), q.dtype, q.shape[-1])
    if key not in _VERDICTS:
        _VERDICTS[key] = _self_check(q.device, q.dtype, q.shape[-1])
    return _VERDICTS[key]


# (queries, keys, causal flag, left-padding mask): a prefill with padding rows that see no key and T, S off the
# kernel's alignments (the bias is copied, lse padded); a decoding step's rows (stride-0 bias); an unmasked
# causal prefill (no bias at all)
_CHECK_CASES = ((45, 45, True, True), (5, 40, False, True), (45, 45, True, False))


def _self_check(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """True when the CUDA fused path matches float32 materialized math on `_CHECK_CASES`; otherwise (or if the
    kernel raises) False, with one warning."""
    tolerance = SELF_CHECK_TOLERANCE[dtype]
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            error = max(_check_error(device, dtype, head_dim, *case) for case in _CHECK_CASES)
        reason = f"max error {error:.3g} (tolerance {tolerance:g})"
    except Exception as err:  # any failure of the kernel on this device means: do not use it
        error, reason = math.inf, f"{type(err).__name__}: {one_line(err)[:200]}"
    if error <= tolerance:
        log.info(
            "fused CUDA attention on %s (%s, head_dim %d) passed its self-check: %s",
            device,
            dtype,
            head_dim,
            reason,
        )
        return True
    log.warning(
        "fused CUDA attention on %s (%s, head_dim %d) failed its self-check, %s: using the materialized "
        "path (O(T x S) memory) for it",
        device,
        dtype,
        head_dim,
        reason,
    )
    return False


def _check_error(device, dtype, head_dim: int, t: int, s: int, is_causal: bool, padded: bool) -> float:
    g = torch.Generator().manual_seed(0)
    b, h = 2, 3
    q = 2 * torch.randn(b, h, t, head_dim, generator=g)  # peaked softmax rows: errors show more
    k, v = torch.randn(b, h, s, head_dim, generator=g), torch.randn(b, h, s, head_dim, generator=g)
    upstream = torch.randn(b, h, t, head_dim, generator=g), torch.randn(b, h, t, generator=g)
    mask = None
    if padded:
        keep = torch.arange(s) >= torch.tensor([0, 7])[:, None]  # (B, S): row 1 has 7 left-padding keys
        mask = torch.zeros(b, 1, 1, s).masked_fill(~keep[:, None, None], float("-inf")).expand(b, 1, t, s)
        mask = mask.to(device, dtype)
    inputs = [x.to(device, dtype) for x in (q, k, v)]
    scale = head_dim**-0.5
    got = _outputs_and_grads(_efficient_attention, inputs, mask, is_causal, scale, upstream)
    want = _outputs_and_grads(_materialized, [x.float() for x in inputs], mask, is_causal, scale, upstream)
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item() for a, b in zip(got, want))


def _outputs_and_grads(attend, inputs, mask, is_causal, scale, upstream) -> list[torch.Tensor]:
    """[out, lse, dq, dk, dv] in float32 for random upstream gradients on both outputs."""
    leaves = [x.detach().requires_grad_() for x in inputs]
    out, lse = attend(*leaves, mask, is_causal, scale)
    grad_out, grad_lse = upstream[0].to(out), upstream[1].to(lse)
    grads = torch.autograd.grad((out, lse), leaves, (grad_out, grad_lse))
    return [x.detach().float() for x in (out, lse, *grads)]


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
    # A fully masked row (a left-padding query) gets output 0 and lse 0, as the fused kernels give it.
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
    """Attention output [B, H, T, D] and log-sum-exp [B, H, T] (float32; float64 for float64) of the masked
    scaled scores.

    q, k, v: [B, H, T|S, D] with KV heads already expanded; mask: additive float [B, 1|H, T|1, S] or None;
    is_causal: top-left causal rule (as SDPA's flag). fused=None picks the fused kernel where it serves (on CUDA
    once its self-check passed); True forces it (on CUDA without the self-check); False: materialized.
    """
    if _on_efficient_device(q):
        why = _efficient_unsupported(q, k, v, mask)
        if fused is None:
            fused = why is None and _efficient_verified(q)
        elif fused and why is not None:
            raise ValueError(f"the fused CUDA attention cannot take these inputs: {why}")
        if fused:
            return _efficient_attention(q, k, v, mask, is_causal, scale)
        return _materialized(q, k, v, mask, is_causal, scale)
    if fused is None:
        fused = q.device.type == "cpu" and q.dtype in FUSED_DTYPES
    if fused:
        return _cpu_attention(q, k, v, mask, is_causal, scale)
    return _materialized(q, k, v, mask, is_causal, scale)


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean keep-mask (True = attend) as the additive float mask the fused kernels take."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
