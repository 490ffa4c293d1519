"""Fused cross-attention (para_train.kernels.cross_attention) against the PyTorch reference, on the CPU
interpreter."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of para_train.kernels

import pytest
import torch

from para_train.kernels import cross_attention, interpreter_active
from para_train.kernels.reference import cross_attention_reference, lengths_to_mask

pytestmark = pytest.mark.skipif(
    not interpreter_active(),
    reason="para_train.kernels was imported before TRITON_INTERPRET=1 was set (another test module imported "
           "it first); add os.environ.setdefault('TRITON_INTERPRET', '1') to tests/conftest.py")

@pytest.fixture(autouse=True)
def one_thread():
    """Triton's interpreter runs many tiny numpy/torch ops: intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float16: dict(atol=3e-3, rtol=1e-2)}


def _qkv(b, h, nq, nk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g).to(dtype).requires_grad_() for n in (nq, nk, nk)]


def _grads(fn, q, k, v, lengths, grad_out, **kwargs):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v, lengths, **kwargs)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


def _compare(q, k, v, lengths, tol, **kwargs):
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.dtype)
    got = _grads(cross_attention, q, k, v, lengths, grad_out, **kwargs)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = _grads(cross_attention_reference, q64, k64, v64, lengths, grad_out.double(), **kwargs)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == q.dtype, name
        # the kernel's output, rounded to its dtype, against the fp64 reference
        torch.testing.assert_close(g.double(), w, **tol, msg=lambda m: f"{name}: {m}")
    return got


# Blocks are 64 queries x 16 keys under the interpreter: the shapes span several of each, with partial
# last blocks, head dims padded to 16, 64 and 128, and lengths of 0, partial, full and beyond N_k.
@pytest.mark.parametrize("b,h,nq,nk,d,lengths", [
    (3, 2, 70, 37, 32, [0, 14, 37]),
    (2, 1, 17, 5, 8, [5, 1]),
    (2, 3, 130, 40, 40, [33, 45]),
    (1, 2, 33, 20, 64, [16]),
    (2, 1, 9, 12, 128, [12, 7]),
])
def test_matches_reference_fp32(b, h, nq, nk, d, lengths):
    _compare(*_qkv(b, h, nq, nk, d, torch.float32), torch.tensor(lengths), TOLERANCE[torch.float32])


def test_every_length_from_0_to_n():
    nk = 20
    _compare(*_qkv(nk + 1, 1, 9, nk, 32, torch.float32), torch.arange(nk + 1), TOLERANCE[torch.float32])


def test_matches_reference_fp16():
    _compare(*_qkv(3, 2, 70, 37, 64, torch.float16), torch.tensor([0, 14, 37]), TOLERANCE[torch.float16])


def test_softmax_scale():
    q, k, v = _qkv(2, 2, 20, 18, 32, torch.float32)
    _compare(q, k, v, torch.tensor([18, 9], dtype=torch.int32), TOLERANCE[torch.float32], softmax_scale=0.3)


def test_padding_gets_zero_output_and_gradients():
    q, k, v = _qkv(3, 2, 40, 24, 32, torch.float32)
    lengths = torch.tensor([0, 5, 24])
    out, dq, dk, dv = _grads(cross_attention, q, k, v, lengths, torch.ones(q.shape))
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    padding = ~lengths_to_mask(lengths, 24)[:, None, :, None].expand_as(dk)
    for name, t in (("out, no keys", out[0]), ("dq, no keys", dq[0]), ("dk, padding", dk[padding]),
                    ("dv, padding", dv[padding])):
        torch.testing.assert_close(t, torch.zeros_like(t), rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_sequence_major_layout():
    # (B, N, H, D) storage passed as (B, H, N, D) views, as the diffusers processor does: same numbers,
    # gradients in the input's layout.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 3, 32, generator=g).requires_grad_() for n in (45, 19, 19))
    views = [t.transpose(1, 2) for t in (q, k, v)]
    lengths = torch.tensor([19, 6])
    out = cross_attention(*views, lengths)
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(out, cross_attention_reference(*(t.detach() for t in views), lengths),
                               **TOLERANCE[torch.float32], msg=lambda m: f"out: {m}")
    want = _qkv(2, 3, 45, 19, 32, torch.float32)
    for w, t in zip(want, (q, k, v)):
        w.data.copy_(t.detach().transpose(1, 2))
    _, *want_grads = _grads(cross_attention_reference, *want, lengths, torch.ones(2, 3, 45, 32))
    for name, t, w in zip(("dq", "dk", "dv"), (q, k, v), want_grads):
        torch.testing.assert_close(t.grad.transpose(1, 2), w, **TOLERANCE[torch.float32], msg=lambda m: f"{name}: {m}")


def test_bad_arguments_are_reported():
    q, k, v = _qkv(2, 2, 8, 6, 32, torch.float32)
    with pytest.raises(ValueError, match="kv_lengths"):
        cross_attention(q, k, v, torch.tensor([6.0, 3.0]))
    with pytest.raises(ValueError, match="head dim"):
        cross_attention(q, k[..., :16], v[..., :16], torch.tensor([6, 3]))
