"""The CUDA fused path of pipeline.attention (memory-efficient kernel + the appended-column backward), its
self-check and its fallbacks, run on CPU tensors: the two kernel ops are replaced by float64 implementations of
their contract (lse padded to a multiple of 32 with +inf, philox tensors, a backward that takes D = rowsum(dO * O)
from the dO and O it is given), and the device predicate says "CUDA" for every tensor."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import pipeline.attention as attention
from pipeline.attention import attention_with_lse

ALIGN = {torch.float32: 4, torch.float16: 8, torch.bfloat16: 8}
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 3e-3,
    torch.bfloat16: 2e-2,
}  # relative to each tensor's max


def check_layout(q, k, v, bias):
    """The kernel's input rules (NOTES.md): what our code must hand it."""
    b, h, t, d = q.shape
    align = ALIGN[q.dtype]
    assert d % align == 0 and k.shape == v.shape == (b, h, k.shape[2], d)
    assert all(x.dtype == q.dtype for x in (q, k, v))
    if bias is not None:
        assert bias.dtype == q.dtype and bias.shape == (b, h, t, k.shape[2])
    for x in (q, k, v) if bias is None else (q, k, v, bias):
        assert x.stride(-1) == 1, x.stride()
        assert all(s % align == 0 for s in (*x.stride()[:-1], x.storage_offset())), (
            x.stride(),
            x.storage_offset(),
        )


def scores(q, k, bias, is_causal, scale):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale  # (B,H,T,S)
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    return s if bias is None else s + bias.double()


def padded_lse(lse: torch.Tensor) -> torch.Tensor:
    t = lse.shape[-1]
    return F.pad(lse.float(), (0, -(-t // 32) * 32 - t), value=float("inf"))


def efficient_forward(q, k, v, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, *, scale=None):
    """The memory-efficient kernel's forward contract; a row that sees no key gets lse 0 and output 0."""
    assert compute_log_sumexp and dropout_p == 0.0
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    check_layout(q, k, v, attn_bias)
    s = scores(q, k, attn_bias, is_causal, scale)
    empty = torch.isneginf(s).all(-1, keepdim=True)
    lse = torch.logsumexp(s.masked_fill(empty, 0.0), -1).masked_fill(empty[..., 0], 0.0)  # (B,H,T)
    out = torch.exp(s - lse[..., None]) @ v.double()
    seed = offset = torch.zeros((), dtype=torch.int64)
    return out.to(q.dtype), padded_lse(lse), seed, offset


def efficient_backward(
    grad_out,
    q,
    k,
    v,
    attn_bias,
    out,
    lse,
    seed,
    offset,
    dropout_p,
    grad_input_mask,
    is_causal=False,
    *,
    scale,
):
    """The backward contract: P from the padded lse it is given, D = rowsum(dO * O) of the dO and O given."""
    assert dropout_p == 0.0 and list(grad_input_mask) == [True, True, True, False]
    check_layout(q, k, v, attn_bias)
    scale = q.shape[-1] ** -0.5 if scale is None else scale  # of the padded head_dim
    t = q.shape[-2]
    assert lse.dtype == torch.float32 and lse.shape == (*q.shape[:2], -(-t // 32) * 32)
    assert torch.isposinf(lse[..., t:]).all()
    assert grad_out.shape == out.shape == q.shape
    p = torch.exp(scores(q, k, attn_bias, is_causal, scale) - lse[..., :t, None].double())
    do = grad_out.double()
    d = (do * out.double()).sum(-1, keepdim=True)
    return _grads(p, do, d, q, k, v, scale)


def _grads(p, do, d, q, k, v, scale):
    ds = p * (do @ v.double().transpose(-1, -2) - d)
    dq = (ds @ k.double()) * scale
    dk = (ds.transpose(-1, -2) @ q.double()) * scale
    dv = p.transpose(-1, -2) @ do
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), torch.empty(0, dtype=q.dtype)


def forward_with_nan_rows(
    q, k, v, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, *, scale=None
):
    """An older kernel's writing of rows that see no key: lse -inf, output NaN."""
    out, lse, seed, offset = efficient_forward(
        q, k, v, attn_bias, compute_log_sumexp, dropout_p, is_causal, scale=scale
    )
    empty = scores(q, k, attn_bias, is_causal, scale).isneginf().all(-1)  # (B,H,T)
    t = q.shape[-2]
    lse[..., :t] = lse[..., :t].masked_fill(empty, float("-inf"))
    return out.masked_fill(empty[..., None], float("nan")), lse, seed, offset


def forward_shifted_lse(*args, **kwargs):
    """Wrong: an lse off by 0.5 (another convention)."""
    out, lse, seed, offset = efficient_forward(*args, **kwargs)
    return out, lse + 0.5, seed, offset


def backward_recomputing_d(
    grad_out,
    q,
    k,
    v,
    attn_bias,
    out,
    lse,
    seed,
    offset,
    dropout_p,
    grad_input_mask,
    is_causal=False,
    *,
    scale,
):
    """Wrong: D from an output it recomputes instead of the O it is given, so the appended columns do nothing."""
    t = q.shape[-2]
    p = torch.exp(scores(q, k, attn_bias, is_causal, scale) - lse[..., :t, None].double())
    do = grad_out.double()
    d = (do * (p @ v.double())).sum(-1, keepdim=True)
    return _grads(p, do, d, q, k, v, scale)


def failing_forward(*args, **kwargs):
    raise RuntimeError("no kernel image is available for execution on the device")


class Calls:
    """Counts calls of the wrapped function."""

    def __init__(self, fn):
        self.fn, self.count = fn, 0

    def __call__(self, *args, **kwargs):
        self.count += 1
        return self.fn(*args, **kwargs)


@pytest.fixture
def kernel(monkeypatch):
    """The CUDA path on CPU tensors: correct kernel stubs, a fresh verdict cache, counted calls."""
    calls = {
        "forward": Calls(efficient_forward),
        "backward": Calls(efficient_backward),
        "check": Calls(attention._self_check),
    }
    monkeypatch.setattr(attention, "_on_efficient_device", lambda x: True)
    monkeypatch.setattr(attention, "_VERDICTS", {})
    monkeypatch.setattr(attention, "_efficient_forward", calls["forward"])
    monkeypatch.setattr(attention, "_efficient_backward", calls["backward"])
    monkeypatch.setattr(attention, "_self_check", calls["check"])

    def use(forward=None, backward=None):
        if forward is not None:
            calls["forward"].fn = forward
        if backward is not None:
            calls["backward"].fn = backward

    calls["use"] = use
    return calls


def reference(q, k, v, keep, scale):
    """float64 attention over the keys `keep` [B, 1, T, S] allows; a row that sees none: output 0, lse 0."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    empty = ~keep.any(-1, keepdim=True)
    s = s.masked_fill(~keep, float("-inf")).masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, -1).masked_fill(empty[..., 0], 0.0)
    return torch.softmax(s, -1).masked_fill(empty, 0.0) @ v.double(), lse


# name -> (query heads, queries, keys, causal flag, left padding per row, mask form); 2 KV heads, expanded
# to the query heads as callers do (autograd sums their gradients over each group)
CASES = {
    "causal": (4, 40, 40, True, (0, 0), None),
    "causal + left padding": (4, 37, 37, True, (0, 6), "padding"),
    "mask with causal and padding folded in (routing's prefill)": (4, 40, 40, False, (3, 0), "full"),
    "decode step": (4, 1, 37, False, (0, 5), "row"),
    # routing's decoding step under GQA: a KV head's 2 query heads are 2 rows of one head, K/V not copied
    "decode step, query heads as rows": (2, 2, 37, False, (0, 5), "row"),
}


def make_case(name, dtype, head_dim=16, seed=0):
    """q, k, v (K/V with 2 heads), the keep-mask [B, 1, T, S] they mean, the additive mask handed over, the causal
    flag and random upstream gradients for out and lse."""
    h, t, s, is_causal, pads, form = CASES[name]
    g = torch.Generator().manual_seed(seed)
    b, kv = 2, 2
    base = [
        (2 * torch.randn(b, h, t, head_dim, generator=g)).to(dtype),
        torch.randn(b, kv, s, head_dim, generator=g).to(dtype),
        torch.randn(b, kv, s, head_dim, generator=g).to(dtype),
    ]
    visible = torch.arange(s)[None] >= torch.tensor(pads)[:, None]  # (B, S)
    keep = visible[:, None, None, :].expand(b, 1, t, s)
    if is_causal or form == "full":
        keep = keep & torch.ones(t, s, dtype=torch.bool).tril()
    mask = None
    if form is not None:
        shown = {"padding": visible[:, None, None, :].expand(b, 1, t, s), "full": keep}
        allowed = shown.get(form, visible[:, None, None, :])  # "row": [B, 1, 1, S], broadcast over queries
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf"))
    upstream = torch.randn(b, h, t, head_dim, generator=g), torch.randn(b, h, t, generator=g)
    return base, keep, mask, is_causal, upstream


def run(base, mask, is_causal, upstream, attend):
    """out, lse and the gradients of the unexpanded q, k, v (GQA: autograd sums over each group)."""
    leaves = [x.detach().requires_grad_() for x in base]
    groups = leaves[0].shape[1] // leaves[1].shape[1]
    q, k, v = leaves[0], *(x.repeat_interleave(groups, 1) for x in leaves[1:])
    scale = q.shape[-1] ** -0.5
    out, lse = attend(q, k, v, mask, is_causal, scale)
    loss = (out.double() * upstream[0].double()).sum() + (lse.double() * upstream[1].double()).sum()
    return out, lse, torch.autograd.grad(loss, leaves)


def assert_matches_float64(base, keep, mask, is_causal, upstream, attend=attention_with_lse):
    dtype = base[0].dtype
    out, lse, grads = run(base, mask, is_causal, upstream, attend)
    want_out, want_lse, want_grads = run(
        [x.double() for x in base],
        None,
        False,
        upstream,
        lambda q, k, v, _mask, _causal, scale: reference(q, k, v, keep, scale),
    )
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == dtype and lse.dtype == lse_dtype and lse.shape == out.shape[:-1]
    for name, got, want in zip(
        ("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), (want_out, want_lse, *want_grads)
    ):
        error = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert error <= TOLERANCE[dtype], f"{name}: {error:.2e}"
    empty = ~keep.any(-1)  # rows that see no key: exactly 0, as the materialized path gives them
    assert (lse[empty.expand_as(lse)] == 0).all() and (out[empty.expand_as(lse)] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_fused_path_equals_float64_math(kernel, name, dtype):
    assert_matches_float64(
        *make_case(name, dtype), lambda *a: attention_with_lse(*a, fused=True)
    )  # no self-check: fused=True
    assert kernel["forward"].count == 1 and kernel["backward"].count == 1 and kernel["check"].count == 0


def unaligned(x: torch.Tensor) -> torch.Tensor:
    """The same values in a view whose strides and start offset break the kernel's alignment."""
    wider = torch.zeros(*x.shape[:-1], x.shape[-1] + 1, dtype=x.dtype)
    wider[..., 1:] = x
    return wider[..., 1:]


def test_operands_in_layouts_the_kernel_refuses_are_copied(kernel):
    base, keep, mask, is_causal, upstream = make_case(
        "mask with causal and padding folded in (routing's prefill)", torch.float16
    )
    base = [unaligned(x) for x in base]
    mask = unaligned(mask)
    assert mask.storage_offset() == 1 and base[0].storage_offset() == 1
    assert_matches_float64(
        base, keep, mask, is_causal, upstream, lambda *a: attention_with_lse(*a, fused=True)
    )
    assert kernel["forward"].count == 1


def test_without_gradients_the_forward_alone_runs(kernel):
    base, keep, mask, is_causal, _ = make_case("causal + left padding", torch.float32)
    q, k, v = base[0], *(x.repeat_interleave(2, 1) for x in base[1:])
    with torch.no_grad():
        out, lse = attention_with_lse(q, k, v, mask, is_causal, 0.25, fused=True)
    want_out, want_lse = reference(q, k, v, keep, 0.25)
    assert out.grad_fn is None and lse.grad_fn is None and kernel["forward"].count == 1
    assert torch.allclose(out.double(), want_out, atol=1e-5) and torch.allclose(
        lse.double(), want_lse, atol=1e-5
    )


def test_rows_that_see_no_key_are_zero_whatever_the_kernel_writes_there(kernel):
    kernel["use"](forward=forward_with_nan_rows)
    case = make_case("causal + left padding", torch.bfloat16)
    assert (~case[1].any(-1)).any()  # the case has such rows
    assert_matches_float64(*case, lambda *a: attention_with_lse(*a, fused=True))


def test_self_check_accepts_the_kernel_once_per_device_dtype_and_head_dim(kernel, caplog):
    with caplog.at_level(logging.INFO, logger="pipeline.attention"):
        for dtype, head_dim in [
            (torch.float32, 16),
            (torch.bfloat16, 16),
            (torch.float32, 16),
            (torch.float32, 8),
        ]:
            assert_matches_float64(*make_case("causal + left padding", dtype, head_dim))
    assert kernel["check"].count == 3  # (fp32, 16) was checked once
    assert attention._VERDICTS == {
        ("cpu", torch.float32, 16): True,
        ("cpu", torch.bfloat16, 16): True,
        ("cpu", torch.float32, 8): True,
    }
    checks = kernel["forward"].count - 4  # the four calls above each ran the kernel once
    assert checks == 3 * len(attention._CHECK_CASES)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("passed its self-check" in r.getMessage() for r in caplog.records) == 3


@pytest.mark.parametrize(
    "wrong", [{"backward": backward_recomputing_d}, {"forward": forward_shifted_lse}], ids=["backward", "lse"]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_self_check_rejects_a_wrong_kernel_and_falls_back(kernel, caplog, wrong, dtype):
    kernel["use"](**wrong)
    case = make_case("causal + left padding", dtype)
    with caplog.at_level(logging.WARNING, logger="pipeline.attention"):
        assert_matches_float64(*case)  # the materialized path's results
        calls = kernel["forward"].count
        assert_matches_float64(*case)
    assert kernel["check"].count == 1 and kernel["forward"].count == calls  # not used again, not re-checked
    assert attention._VERDICTS == {("cpu", dtype, 16): False}
    (record,) = caplog.records
    message = record.getMessage()
    assert record.levelno == logging.WARNING and "failed its self-check" in message
    assert "cpu" in message and str(dtype) in message and "head_dim 16" in message and "max error" in message


def test_a_kernel_that_raises_falls_back_with_a_warning(kernel, caplog):
    kernel["use"](forward=failing_forward)
    with caplog.at_level(logging.WARNING, logger="pipeline.attention"):
        assert_matches_float64(*make_case("decode step", torch.float16))
    assert attention._VERDICTS == {("cpu", torch.float16, 16): False}
    assert "RuntimeError: no kernel image" in caplog.records[0].getMessage()


@pytest.mark.parametrize("dtype, head_dim", [(torch.bfloat16, 12), (torch.float32, 6), (torch.float64, 16)])
def test_inputs_the_kernel_cannot_take_fall_back_without_a_self_check(kernel, dtype, head_dim):
    case = make_case("causal + left padding", dtype, head_dim)
    assert_matches_float64(*case)
    assert kernel["check"].count == 0 and kernel["forward"].count == 0
    with pytest.raises(ValueError, match="cannot take"):
        run(case[0], case[2], case[3], case[4], lambda *a: attention_with_lse(*a, fused=True))


def test_cpu_tensors_take_the_cpu_kernel_by_default():
    assert not attention._on_efficient_device(torch.zeros(1))
