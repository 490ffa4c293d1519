"""`para-train plan`: its FLOP counts against torch.utils.flop_counter (tiny and mid-size models), its
model-state memory against the shared real 2-rank ZeRO-3 run (conftest's `three_stages`), the real-scale stage-1 plan, and a stage that
does not fit together with the change that makes it fit."""
import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import REPO
from para_train import plan
from para_train.config import TINY_UNET, load_config
from para_train.models.tiny import TINY_LLAMA, TINY_VAE

MID_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=[64, 128, 256], layers_per_block=2,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                transformer_layers_per_block=[1, 1, 2], attention_head_dim=[2, 4, 8], cross_attention_dim=256,
                use_linear_projection=True, norm_num_groups=32)
MID_LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=1000)
MID_VAE = dict(TINY_VAE, block_out_channels=[32, 64, 128, 128], layers_per_block=2, mid_block_add_attention=True,
               down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)  # SD-like: 8x
LORA = ("q_proj", "k_proj", "v_proj", "o_proj")


def counted(fn) -> int:
    """FLOPs torch.utils.flop_counter sees; SDPA's math path, so that attention is made of counted matmuls."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def assert_counts(ours: int, got: int, checkpointing: bool) -> None:
    if checkpointing:  # the planner recomputes whole units; PyTorch stops a unit's recomputation early
        assert got <= ours <= 1.10 * got, (ours, got)
    else:
        assert ours == pytest.approx(got, rel=1e-4)


@pytest.fixture
def one_thread():
    """Two busy cores shared with other processes: one thread runs these small ops many times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("size", ["tiny", "mid"])
def test_flop_counts_match_torch_flop_counter(size, one_thread):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    unet_cfg, hw, tokens, llm_cfg, vae_cfg = {
        "tiny": (TINY_UNET, 8, 48, dict(TINY_LLAMA, vocab_size=2048), TINY_VAE),
        "mid": (MID_UNET, 16, 96, MID_LLAMA, MID_VAE)}[size]
    cross = unet_cfg["cross_attention_dim"]
    x, t = torch.randn(1, 4, hw, hw), torch.tensor([500])
    mask = torch.ones(1, tokens, dtype=torch.long)
    mask[:, tokens // 2:] = 0
    for text_grad in (False, True):  # stage 1 (frozen LLM), stages 2-3 (LoRA: the text carries gradients)
        text = torch.randn(1, tokens, cross, requires_grad=text_grad)
        for ckpt in (False, True):
            unet = UNet2DConditionModel(**unet_cfg)
            if ckpt:
                unet.enable_gradient_checkpointing()
            got = counted(lambda: unet(x, t, encoder_hidden_states=text, encoder_attention_mask=mask)
                          .sample.square().mean().backward())
            ours = plan.unet_flops(unet_cfg, hw, tokens, text_needs_grad=text_grad, checkpointing=ckpt).train
            assert_counts(ours, got, ckpt)

    ids = torch.randint(0, llm_cfg["vocab_size"], (1, tokens))
    llm = LlamaModel(LlamaConfig(**llm_cfg)).requires_grad_(False)
    with torch.no_grad():
        got = counted(lambda: llm(input_ids=ids, attention_mask=mask))
    assert plan.llama_flops(llm_cfg, tokens).forward == pytest.approx(got, rel=1e-4)
    for ckpt in (False, True):
        lora = get_peft_model(LlamaModel(LlamaConfig(**llm_cfg)), LoraConfig(r=8, lora_alpha=16, target_modules=list(LORA)))
        lora.train()
        if ckpt:
            lora.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        got = counted(lambda: lora(input_ids=ids, attention_mask=mask).last_hidden_state.square().mean().backward())
        assert_counts(plan.llama_flops(llm_cfg, tokens, 8, LORA, trainable=True, checkpointing=ckpt).train, got, ckpt)

    vae = AutoencoderKL(**vae_cfg)
    with torch.no_grad():
        got = counted(lambda: vae.encode(torch.randn(1, 3, 32, 32)))
    assert plan.vae_encode_flops(vae_cfg, 32) == got


@pytest.mark.parametrize("stage,precision,overrides", [(1, "fp32", []), (3, "bf16", ["model.projection=true"])])
def test_planned_model_state_memory_matches_two_real_ranks(three_stages, cache_dir, stage, precision, overrides,
                                                           one_thread):
    """Against the bytes each rank of the shared 2-rank run held after its first step (ranks/rank<r>.json):
    stage 1 in fp32 (UNet trained, LLM frozen), stage 3 in bf16 (LoRA, projection and UNet trained, EMA)."""
    run_dir, _ = three_stages
    measured = [json.loads((run_dir / f"stage{stage}" / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in measured] == [2, 2] and measured[0]["precision"] == precision
    cfg = load_config(stage, None, [f"data.cache_dir={cache_dir}", f"train.precision={precision}", *overrides])
    p = plan.make_plan(cfg, plan.Setup(nodes=1, gpus_per_node=2, gpu="a100-40gb"))
    estimate = p.memory.trainable_states + p.memory.frozen_states
    for rank in measured:
        state = rank["model_state_bytes"]
        assert abs(estimate - state["total"]) <= 0.2 * state["total"], (stage, precision, estimate, state)
        # and the planner counted the same parameters DeepSpeed sharded
        assert p.inv.trainable == state["numel_trainable"] and p.inv.frozen == state["numel_frozen"]


def test_real_scale_stage1_plan_on_64_nodes(capsys, one_thread):
    from para_train.cli import main

    code = main(["plan", "--config", str(REPO / "configs" / "stage1_pretrain.yaml"), "--nodes", "64",
                 "--gpus-per-node", "8", "--gpu", "h100-80gb"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "stage 1, 64 node(s) x 8 h100-80gb" in out and "= 512 GPUs, bf16" in out
    assert "LLM 6.61B frozen; UNet 2.90B trained" in out
    assert "UNet        forward    7.589 T" in out  # the analytic count the FLOP test checks at small sizes
    assert "146500 steps" in out and "verdict: fits" in out


def test_a_stage_that_does_not_fit_gets_a_change_that_fits(cache_dir, one_thread):
    """A mid-size stage-2 model at a huge micro batch on one L40S: the plan says so, and its change fits."""
    base = [f"data.cache_dir={cache_dir}", "model.llm.path=null", f"model.llm.config={json.dumps(MID_LLAMA)}",
            f"model.unet.config={json.dumps(MID_UNET)}", "model.llm.max_length=96", "data.resolution=128",
            "train.micro_batch_size=8192", "checkpoint.init_from=none"]
    setup = plan.Setup(nodes=1, gpus_per_node=1, gpu="l40s-48gb")
    p = plan.make_plan(load_config(2, None, base), setup)
    assert not p.fits
    report = plan.format_plan(p, "mid-size")
    assert "verdict: DOES NOT FIT" in report and "change: " in report
    changes, predicted = plan.suggest_fix(p)
    fixed = plan.make_plan(load_config(2, None, base + changes), setup)
    assert fixed.fits and fixed.global_batch == p.global_batch
    assert fixed.memory.total == pytest.approx(predicted.total, rel=0.05)
