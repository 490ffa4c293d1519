"""para_train.kernel_dispatch: choices, peft/diffusers integration, and training with and without kernels."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of para_train.kernels

import copy
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import Linear as LoraLinear
from transformers import LlamaConfig, LlamaModel

from para_train import kernel_dispatch
from para_train.kernel_dispatch import FusedLoraLinear, apply_kernels, remove_kernels
from para_train.kernels import interpreter_active
from para_train.kernels.reference import cross_attention_reference, lengths_to_mask

needs_interpreter = pytest.mark.skipif(
    not interpreter_active(),
    reason="para_train.kernels was imported before TRITON_INTERPRET=1 was set (another test module imported "
           "it first); add os.environ.setdefault('TRITON_INTERPRET', '1') to tests/conftest.py")

LENGTHS = [7, 3, 1]  # text tokens per sample: full, padded, BOS only


def tiny_llm(dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(LlamaModel(config), lora)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero, which would hide the adapter's contribution
            torch.nn.init.normal_(param, std=0.2)
    return model


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), cross_attention_dim=32, layers_per_block=1, sample_size=8,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8)


def text_batch(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = lengths_to_mask(torch.tensor(lengths), 7).long()
    return torch.randint(0, 64, mask.shape, generator=g), mask


def unet_inputs(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    return dict(sample=torch.randn(b, 4, 8, 8, generator=g), timestep=torch.randint(0, 1000, (b,), generator=g),
                encoder_hidden_states=torch.randn(b, 7, 32, generator=g).requires_grad_(),
                encoder_attention_mask=lengths_to_mask(torch.tensor(lengths), 7).long())


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models and Triton's interpreter only lose from intra-op threads (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same(got, want, name):
    """fp32 agreement up to summation order: errors scale with the tensor's largest entry."""
    torch.testing.assert_close(got, want, atol=1e-5 * max(1.0, want.abs().max().item()), rtol=1e-4,
                               msg=lambda m: f"{name}: {m}")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of the fused ops made through the dispatch (proves the kernel path ran)."""
    counts = {"lora": 0, "attention": 0}

    def counted(key, fn):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(kernel_dispatch, "lora_linear", counted("lora", kernel_dispatch.lora_linear))
    monkeypatch.setattr(kernel_dispatch, "triton_cross_attention",
                        counted("attention", kernel_dispatch.triton_cross_attention))
    return counts


# ------------------------------------------------------------------------------------------- choices


def test_auto_without_gpu_keeps_pytorch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    llm, unet = tiny_llm(), tiny_unet()
    assert apply_kernels(llm, unet) == {"lora": "torch", "cross_attention": "sdpa"}
    assert all(type(m) is not FusedLoraLinear for m in llm.modules())
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())


def test_unknown_choice_is_rejected():
    with pytest.raises(ValueError, match="choose one of auto, triton, torch"):
        apply_kernels(None, None, lora="fused")
    with pytest.raises(ValueError, match="choose one of auto, triton, flash_attn, sdpa"):
        apply_kernels(None, None, cross_attention="xformers")


def test_triton_without_gpu_names_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(kernel_dispatch, "interpreter_active", lambda: False)
    with pytest.raises(ValueError, match="kernels.lora=auto"):
        apply_kernels(None, None, lora="triton", cross_attention="sdpa")
    with pytest.raises(ValueError, match="kernels.cross_attention=auto"):
        apply_kernels(None, None, lora="torch", cross_attention="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_kernels_on_cpu_tensors_without_interpreter_name_the_fix():
    script = (
        "import torch\n"
        "from para_train.kernels import cross_attention, lora_linear\n"
        "x = torch.randn(2, 4)\n"
        "calls = [lambda: lora_linear(x, torch.randn(3, 4), None, torch.randn(1, 4), torch.randn(3, 1), 1.0),\n"
        "         lambda: cross_attention(*[torch.randn(1, 1, 2, 16)] * 3, torch.tensor([2]))]\n"
        "for call in calls:\n"
        "    try:\n"
        "        call()\n"
        "    except ValueError as err:\n"
        "        print(err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert lines[0].startswith("lora_linear:") and lines[1].startswith("cross_attention:")
    assert all("TRITON_INTERPRET=1" in line and "lora='torch'" in line for line in lines)


def test_flash_attn_missing_names_the_extra(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # makes `import flash_attn` fail
    with pytest.raises(ImportError, match=r"pip install \.\[gpu\]"):
        apply_kernels(None, tiny_unet(), lora="torch", cross_attention="flash_attn")


# ---------------------------------------------------------------------------------------------- LoRA


def _llm_forward_backward(llm):
    ids, mask = text_batch()
    out = llm(input_ids=ids, attention_mask=mask).last_hidden_state
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
    grads = {n: p.grad.clone() for n, p in llm.named_parameters() if p.requires_grad}
    llm.zero_grad(set_to_none=True)
    return out.detach(), grads


@needs_interpreter
def test_fused_lora_matches_peft(kernel_calls):
    llm = tiny_llm()
    reference = copy.deepcopy(llm)
    assert apply_kernels(llm, None, lora="triton", cross_attention="sdpa")["lora"] == "triton"
    out, grads = _llm_forward_backward(llm)
    assert kernel_calls["lora"] == 8  # q, k, v, o in 2 layers
    want_out, want_grads = _llm_forward_backward(reference)
    assert_same(out, want_out, "last_hidden_state")
    assert sorted(grads) == sorted(want_grads) and len(grads) == 16
    for name in grads:
        assert_same(grads[name], want_grads[name], name)
    # Same modules for peft: state dicts (full and adapter-only) keep their keys.
    assert list(llm.state_dict()) == list(reference.state_dict())
    assert list(get_peft_model_state_dict(llm)) == list(get_peft_model_state_dict(reference))


@needs_interpreter
def test_lora_dropout_runs_peft_forward(kernel_calls):
    llm = tiny_llm(dropout=0.1)
    reference = copy.deepcopy(llm)
    apply_kernels(llm, None, lora="triton", cross_attention="sdpa")
    torch.manual_seed(5)
    out, _ = _llm_forward_backward(llm)
    torch.manual_seed(5)
    want, _ = _llm_forward_backward(reference)
    assert kernel_calls["lora"] == 0
    assert torch.equal(out, want)  # same dropout masks: the fused op (no dropout) would differ


@needs_interpreter
def test_trainable_base_layer_runs_peft_forward(kernel_calls):
    llm = tiny_llm()
    for name, param in llm.named_parameters():
        param.requires_grad_("lora_" in name or "q_proj.base_layer" in name)
    reference = copy.deepcopy(llm)
    apply_kernels(llm, None, lora="triton", cross_attention="sdpa")
    _, grads = _llm_forward_backward(llm)
    _, want_grads = _llm_forward_backward(reference)
    assert kernel_calls["lora"] == 6  # k, v, o in 2 layers; q_proj trains its base weight through peft
    for name in want_grads:
        assert_same(grads[name], want_grads[name], name)


@needs_interpreter
def test_merged_adapter_runs_base_layer_only(kernel_calls):
    llm = tiny_llm()
    reference = copy.deepcopy(llm)
    apply_kernels(llm, None, lora="triton", cross_attention="sdpa")
    llm.merge_adapter()
    reference.merge_adapter()
    with torch.no_grad():
        ids, mask = text_batch()
        merged = llm(input_ids=ids, attention_mask=mask).last_hidden_state
        want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        assert kernel_calls["lora"] == 0
        assert torch.equal(merged, want)  # the fused op on merged weights would add the adapter twice
        llm.unmerge_adapter()
        llm(input_ids=ids, attention_mask=mask)
        assert kernel_calls["lora"] == 8


@needs_interpreter
def test_remove_kernels_restores_pytorch_paths():
    llm, unet = tiny_llm(), tiny_unet()
    apply_kernels(llm, unet, lora="triton", cross_attention="triton")
    assert sum(type(m) is FusedLoraLinear for m in llm.modules()) == 8
    remove_kernels(llm, unet)
    assert sum(type(m) is LoraLinear for m in llm.modules()) == 8
    assert all(type(p) is AttnProcessor2_0 for p in unet.attn_processors.values())


# ----------------------------------------------------------------------------------- cross-attention


def _unet_forward_backward(unet, inputs):
    out = unet(**inputs).sample
    out.backward(torch.cos(torch.arange(out.numel(), dtype=out.dtype)).view_as(out))
    text_grad = inputs["encoder_hidden_states"].grad.clone()
    inputs["encoder_hidden_states"].grad = None
    grads = {n: p.grad.clone() for n, p in unet.named_parameters() if "attn2.to_" in n}
    unet.zero_grad(set_to_none=True)
    return out.detach(), text_grad, grads


def _assert_same_unet(unet, reference, inputs):
    out, text_grad, grads = _unet_forward_backward(unet, inputs)
    want_out, want_text_grad, want_grads = _unet_forward_backward(reference, inputs)
    assert_same(out, want_out, "unet output")
    assert_same(text_grad, want_text_grad, "d encoder_hidden_states")
    for name in want_grads:
        assert_same(grads[name], want_grads[name], name)


@needs_interpreter
def test_triton_processor_matches_default_with_mask(kernel_calls):
    unet = tiny_unet()
    reference = copy.deepcopy(unet)
    assert apply_kernels(None, unet, lora="torch", cross_attention="triton")["cross_attention"] == "triton"
    _assert_same_unet(unet, reference, unet_inputs())
    assert kernel_calls["attention"] == 4  # attn2 of the 4 transformer blocks
    without_mask = unet_inputs()
    without_mask.pop("encoder_attention_mask")
    _assert_same_unet(unet, reference, without_mask)
    assert kernel_calls["attention"] == 8


@needs_interpreter
def test_non_prefix_mask_falls_back_to_sdpa(kernel_calls):
    unet = tiny_unet()
    reference = copy.deepcopy(unet)
    apply_kernels(None, unet, lora="torch", cross_attention="triton")
    inputs = unet_inputs()
    inputs["encoder_attention_mask"] = torch.tensor([[1, 1, 0, 1, 1, 1, 1], [1] * 7, [1, 0, 0, 0, 0, 0, 0]])
    _assert_same_unet(unet, reference, inputs)
    assert kernel_calls["attention"] == 0


def _fake_flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 dropout_p=0.0, softmax_scale=None, causal=False):
    """flash-attn's varlen contract in plain PyTorch: packed (total, H, D) tensors split by cu_seqlens."""
    assert dropout_p == 0.0 and not causal
    assert max_seqlen_k == int((cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max())
    out = []
    for i in range(len(cu_seqlens_q) - 1):
        qi, ki, vi = (t[cu[i]:cu[i + 1]].transpose(0, 1)[None]
                      for t, cu in ((q, cu_seqlens_q), (k, cu_seqlens_k), (v, cu_seqlens_k)))
        lengths = torch.tensor([ki.shape[2]])
        out.append(cross_attention_reference(qi, ki, vi, lengths, softmax_scale)[0].transpose(0, 1))
    return torch.cat(out)


def test_flash_attn_processor_unpads_keys(monkeypatch):
    # flash-attn cannot run here; a PyTorch stand-in with its varlen contract checks the unpadding.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fake = types.SimpleNamespace(flash_attn_varlen_func=_fake_flash_attn_varlen_func)
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    unet = tiny_unet()
    reference = copy.deepcopy(unet)
    assert apply_kernels(None, unet, lora="torch", cross_attention="flash_attn")["cross_attention"] == "flash_attn"
    _assert_same_unet(unet, reference, unet_inputs())


# ------------------------------------------------------------------------------------------ training


class MiniParaDiffusion(torch.nn.Module):
    """The tiny LoRA-LLM feeding the tiny UNet, as in ParaDiffusion."""

    def __init__(self):
        super().__init__()
        self.llm = tiny_llm()
        self.unet = tiny_unet()

    def loss(self, ids, mask, latents, noise, timesteps):
        text = self.llm(input_ids=ids, attention_mask=mask).last_hidden_state
        noisy = latents + noise * (timesteps.float() / 1000).view(-1, 1, 1, 1)
        pred = self.unet(noisy, timesteps, encoder_hidden_states=text, encoder_attention_mask=mask).sample
        return F.mse_loss(pred, noise)


def _train(model, steps=5):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        ids, mask = text_batch(lengths=[7, 4], seed=int(torch.randint(0, 1000, (1,), generator=g)))
        latents, noise = torch.randn(2, 2, 4, 8, 8, generator=g)
        loss = model.loss(ids, mask, latents, noise, torch.randint(0, 1000, (2,), generator=g))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@needs_interpreter
def test_training_losses_match_with_and_without_kernels(kernel_calls):
    model = MiniParaDiffusion()
    fused = copy.deepcopy(model)
    apply_kernels(model.llm, model.unet, lora="torch", cross_attention="sdpa")
    apply_kernels(fused.llm, fused.unet, lora="triton", cross_attention="triton")
    want = _train(model)
    got = _train(fused)
    assert kernel_calls == {"lora": 5 * 8, "attention": 5 * 4}
    assert want[-1] != want[0]  # the model does train
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), atol=0.0, rtol=1e-4,
                               msg=lambda m: f"losses per step: {m}")
