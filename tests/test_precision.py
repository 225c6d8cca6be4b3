"""log Z2, log Z1 and mu in float32 on every path, whatever the input dtype or autocast: from bf16 / fp16 inputs
they equal float64 math on the same rounded inputs."""

from __future__ import annotations

import pytest
import torch

from pipeline.attention import additive_mask, attention_with_lse
from pipeline.methods.mimic import MimicShift, ShiftSpec


def inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, h, t, d = 2, 4, 24, 32
    q, k, v = (
        (3 * torch.randn(b, h, t, d, generator=g)).to(dtype),
        torch.randn(b, h, t, d, generator=g).to(dtype),
        torch.randn(b, h, t, d, generator=g).to(dtype),
    )
    keep = torch.ones(b, 1, t, t, dtype=torch.bool).tril()
    keep[1, :, :, :5] = False  # left padding of row 1
    keep[1, :, :5, :5] = torch.eye(5, dtype=torch.bool)  # padding rows see themselves only (not empty)
    return q, k, v, keep


def reference_lse(q, k, keep, scale):
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    return torch.logsumexp(scores.masked_fill(~keep, float("-inf")), -1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused", [True, False])
def test_log_z2_is_float32_and_equals_float64_math_on_the_rounded_inputs(dtype, fused):
    q, k, v, keep = inputs(dtype)
    scale = q.shape[-1] ** -0.5
    out, lse = attention_with_lse(q, k, v, additive_mask(keep, dtype), False, scale, fused=fused)
    assert lse.dtype == torch.float32 and out.dtype == dtype
    assert (lse.double() - reference_lse(q, k, keep, scale)).abs().max() <= 1e-5


@pytest.mark.parametrize("autocast", [False, True])
def test_mu_is_float32_from_bf16_queries_even_under_autocast(autocast):
    q, k, v, keep = inputs(torch.bfloat16, seed=1)
    scale = q.shape[-1] ** -0.5
    spec = ShiftSpec("mimic", (0,), num_heads=4, head_dim=32, hidden_size=128)
    shift = MimicShift(spec, torch.Generator().manual_seed(2))
    with torch.no_grad():
        shift.w.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
        shift.b.fill_(1.5)
    _, lse = attention_with_lse(q, k, v, additive_mask(keep, q.dtype), False, scale)
    context = (
        torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    )
    with context:
        mu = shift.magnitude(0, q, lse)
    log_z1 = (
        torch.einsum("bhtd,hd->bht", q.double(), shift.w[0].double()) + shift.b[0].double()[None, :, None]
    )
    want = torch.sigmoid(log_z1 - reference_lse(q, k, keep, scale))
    assert mu.dtype == torch.float32
    assert (mu.double() - want).abs().max() <= 1e-5
