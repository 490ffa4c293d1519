"""Where the Triton kernels can run: CUDA tensors, or CPU tensors under Triton's interpreter."""
import torch
import triton


@triton.jit
def _probe():
    pass


def interpreter_active() -> bool:
    """True when @triton.jit kernels run through Triton's CPU interpreter.

    Triton decides this when a kernel is decorated, from TRITON_INTERPRET=1 in the environment at the
    time this package is imported (not when the kernel is called).
    """
    return not isinstance(_probe, triton.runtime.JITFunction)


def check_devices(op: str, *tensors: torch.Tensor) -> None:
    """Raise a ValueError naming the fix unless Triton can run `op` on these tensors."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cuda" or (device.type == "cpu" and interpreter_active()):
        return
    raise ValueError(
        f"{op}: Triton kernels need CUDA tensors (got {device}). On a machine without a GPU use the PyTorch path "
        "(kernel_dispatch.apply_kernels(..., lora='torch', cross_attention='sdpa')), or set TRITON_INTERPRET=1 "
        "before para_train.kernels is first imported to run them (slowly) through Triton's CPU interpreter."
    )


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for `dtype`: fp32 follows torch's TF32 switch so results match torch.matmul."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # Triton's default; only affects fp32 operands


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on `device` (1 under the interpreter: it runs programs one by one)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
