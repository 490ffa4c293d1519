"""Fused LoRA linear (para_train.kernels.lora_linear) against the PyTorch reference, on the CPU interpreter."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of para_train.kernels

import pytest
import torch

from para_train.kernels import interpreter_active, lora_linear
from para_train.kernels.reference import lora_linear_reference

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


TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2)}


def _operands(lead, k, n, r, dtype, bias=True, lora_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lora_dtype = lora_dtype or dtype
    x = torch.randn(*lead, k, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    lora_a = (torch.randn(r, k, generator=g) / k**0.5).to(lora_dtype).requires_grad_()
    lora_b = (torch.randn(n, r, generator=g) / r**0.5).to(lora_dtype).requires_grad_()
    return x, weight, b, lora_a, lora_b


def _run(fn, x, weight, bias, lora_a, lora_b, scale, grad_out):
    """Output and gradients (x, A, B) of fn; x/A/B that do not require grad give None."""
    for t in (x, lora_a, lora_b):
        t.grad = None
    y = fn(x, weight, bias, lora_a, lora_b, scale)
    y.backward(grad_out)
    return y.detach(), x.grad, lora_a.grad, lora_b.grad


def _compare(x, weight, bias, lora_a, lora_b, scale, tol):
    y = lora_linear(x, weight, bias, lora_a, lora_b, scale)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    got = _run(lora_linear, x, weight, bias, lora_a, lora_b, scale, grad_out)
    # fp64 reference from the same (rounded) values
    x64, a64, b64 = (t.detach().double().requires_grad_(t.requires_grad) for t in (x, lora_a, lora_b))
    bias64 = bias.double() if bias is not None else None
    want = _run(lora_linear_reference, x64, weight.double(), bias64, a64, b64, scale, grad_out.double())
    assert got[0].dtype == x.dtype
    for name, g, w in zip(("y", "dx", "dA", "dB"), got, want):
        assert (g is None) == (w is None), name
        if g is not None:
            # the kernel's output, rounded to its dtype, against the fp64 reference
            torch.testing.assert_close(g.double(), w, **tol, msg=lambda m: f"{name}: {m}")


# Block size is 32 under the interpreter: these shapes cover one and several row blocks, column groups of
# 1, 2 and 5 blocks (and a partial last group: 160 outputs = 5 blocks in groups of 2), and split dS sums.
@pytest.mark.parametrize("lead,k,n,r", [
    ((3, 7), 37, 53, 1),
    ((3, 7), 37, 160, 4),
    ((2, 41), 37, 53, 8),
    ((2, 41), 37, 160, 16),
    ((5,), 64, 40, 20),
])
def test_matches_reference_fp32(lead, k, n, r):
    _compare(*_operands(lead, k, n, r, torch.float32), scale=2.0, tol=TOLERANCE[torch.float32])


@pytest.mark.parametrize("lead,k,n,r", [((3, 7), 37, 53, 4), ((2, 41), 37, 160, 16)])
def test_matches_reference_fp16(lead, k, n, r):
    _compare(*_operands(lead, k, n, r, torch.float16), scale=0.5, tol=TOLERANCE[torch.float16])


def test_no_bias_and_fp32_adapter_on_fp16_input():
    # peft keeps adapter weights in fp32 next to an fp16/bf16 base layer; gradients come back in fp32.
    x, weight, _, lora_a, lora_b = _operands((2, 9), 24, 33, 8, torch.float16, bias=False, lora_dtype=torch.float32)
    _compare(x, weight, None, lora_a, lora_b, scale=1.0, tol=TOLERANCE[torch.float16])
    assert lora_a.grad.dtype == lora_b.grad.dtype == torch.float32


def test_only_requested_gradients():
    # First layer: the input needs no gradient, the adapter does; frozen adapter: only dx.
    x, weight, bias, lora_a, lora_b = _operands((4, 5), 37, 53, 4, torch.float32)
    x.requires_grad_(False)
    _compare(x, weight, bias, lora_a, lora_b, scale=1.5, tol=TOLERANCE[torch.float32])
    x, weight, bias, lora_a, lora_b = _operands((4, 5), 37, 53, 4, torch.float32)
    lora_a.requires_grad_(False)
    lora_b.requires_grad_(False)
    _compare(x, weight, bias, lora_a, lora_b, scale=1.5, tol=TOLERANCE[torch.float32])


def test_non_contiguous_input():
    x, weight, bias, lora_a, lora_b = _operands((6, 37), 5, 53, 4, torch.float32)
    xt = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # same values, other strides
    assert not xt.is_contiguous()
    _compare(xt, weight, bias, lora_a, lora_b, scale=1.0, tol=TOLERANCE[torch.float32])


def test_empty_batch():
    x, weight, bias, lora_a, lora_b = _operands((0, 3), 16, 24, 4, torch.float32)
    y = lora_linear(x, weight, bias, lora_a, lora_b, 1.0)
    assert y.shape == (0, 3, 24)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for name, grad in (("dA", lora_a.grad), ("dB", lora_b.grad)):
        torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def test_bad_shapes_are_reported():
    x, weight, bias, lora_a, lora_b = _operands((2,), 16, 24, 4, torch.float32)
    with pytest.raises(ValueError, match="lora_a"):
        lora_linear(x, weight, bias, lora_a[:, :8], lora_b, 1.0)
    with pytest.raises(ValueError, match="float16"):
        lora_linear(x, weight.half(), bias, lora_a, lora_b, 1.0)
    with pytest.raises(ValueError, match="requires_grad_"):  # the op never computes dW
        lora_linear(x, weight.requires_grad_(), bias, lora_a, lora_b, 1.0)
