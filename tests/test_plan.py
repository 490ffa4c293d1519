"""`para-train plan`: its FLOPs (each part's, from the one traced step, against that part counted alone; the LLM's
against 2 x parameters x tokens at real scale), how its figures move with the micro batch, checkpointing and the
number of GPUs, its model-state memory against the shared real 2-rank ZeRO-3 run (conftest's `three_stages`), the
real-scale stage-1 plan, bad input, and a stage that does not fit together with the change that makes it fit."""
import json
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import REPO
from para_train import plan
from para_train.cli import main
from para_train.config import load_config

MID_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=[64, 128, 256], layers_per_block=2,
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                transformer_layers_per_block=[1, 1, 2], attention_head_dim=[2, 4, 8], cross_attention_dim=256,
                use_linear_projection=True, norm_num_groups=32)
MID_LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, vocab_size=1000)
A100 = plan.Setup(nodes=1, gpus_per_node=2, gpu="a100-40gb")


@pytest.fixture
def one_thread():
    """Two busy cores shared with other processes: one thread runs these small ops many times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(cache_dir, stage: int, *overrides: str):
    return load_config(stage, None, [f"data.cache_dir={cache_dir}", "train.precision=fp32", *overrides])


def test_each_parts_flops_are_what_that_part_runs_alone(cache_dir, one_thread):
    """Stage 2 with a projection: the trace splits one counter between the parts; each part run alone on its own
    inputs gives the same forward FLOPs under PyTorch's stock counter with attention as plain matmuls (so
    attention is counted), and the same backward FLOPs (so the split in the backward falls where the parts meet)."""
    cfg = tiny(cache_dir, 2, "model.projection=true", "model.unet.config.cross_attention_dim=48")
    arch = plan.architecture(cfg)
    b, tokens, res = 2, cfg.model.llm.max_length, cfg.data.resolution
    trace = plan.trace_step(cfg, arch, torch.float32, b, True, True, False, False)

    from diffusers import AutoencoderKL
    model = plan.build_meta_model(cfg, arch, torch.float32)
    with torch.device("meta"):
        vae = AutoencoderKL(**arch.vae)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    plan.fakeify(model, fake)
    plan.fakeify(vae, fake)
    llm, projection, unet = model.text_encoder.llm, model.text_encoder.projection, model.unet
    latent = res // 2 ** (len(arch.vae["block_out_channels"]) - 1)
    with fake:
        ids = torch.zeros(b, tokens, dtype=torch.long)
        text = torch.empty(b, tokens, arch.llm["hidden_size"], requires_grad=True)
        cond = torch.empty(b, tokens, arch.unet["cross_attention_dim"], requires_grad=True)
        x, t, mask = torch.empty(b, 4, latent, latent), torch.zeros(b, dtype=torch.long), torch.ones(b, tokens)
        runs = {"vae": lambda: vae.encode(torch.empty(b, 3, res, res)).latent_dist.sample(),
                "llm": lambda: llm(input_ids=ids, use_cache=False).last_hidden_state,
                "projection": lambda: projection(text),
                "unet": lambda: unet(x, t, encoder_hidden_states=cond, encoder_attention_mask=mask).sample}
        for part, run in runs.items():
            with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as stock:
                run()
            assert trace.forward[part] == stock.get_total_flops() > 0, part
            if part != "vae":
                out = run()
                with plan.flop_counter() as counter:
                    out.square().mean().backward()
                assert trace.backward[part] == counter.get_total_flops() > 0, part
    assert trace.backward["vae"] == 0


def test_real_scale_llm_flops_are_two_per_parameter_and_token(one_thread):
    """The frozen Llama-2-7B of stage 1 at 512 tokens: forward ~ 2 x (parameters without the embedding) x tokens,
    plus attention (2 x 2 x tokens^2 x width per layer, at most a few percent here); no backward."""
    cfg = load_config(1, REPO / "configs" / "stage1_pretrain.yaml")
    p = plan.make_plan(cfg, plan.Setup(nodes=64, gpus_per_node=8, gpu="h100-80gb"))
    llm, tokens = p.arch.llm, cfg.model.llm.max_length
    dense = 2 * (p.inv.llm - p.inv.frozen_llm_embedding) * tokens
    attention = 4 * tokens ** 2 * llm["hidden_size"] * llm["num_hidden_layers"]
    f = p.flops_per_sample
    assert f["llm"].forward == pytest.approx(dense + attention, rel=0.01)
    assert f["llm"].backward == f["llm"].recompute == 0
    # the UNet trains with checkpointing: its backward costs about twice its forward, and recomputes at most it
    assert 1.8 * f["unet"].forward < f["unet"].backward < 2.2 * f["unet"].forward
    assert 0.5 * f["unet"].forward < f["unet"].recompute <= f["unet"].forward
    assert f["vae"].forward > 0 and f["vae"].backward == 0


def test_flops_and_activations_scale_with_the_micro_batch(cache_dir, one_thread):
    one, four = (plan.make_plan(tiny(cache_dir, 2, f"train.micro_batch_size={b}"), A100) for b in (1, 4))
    for part in plan.PARTS:  # ~: a few small matmuls (Llama's rotary embedding) run once per batch
        assert one.flops_per_sample[part].train == pytest.approx(four.flops_per_sample[part].train, rel=1e-3), part
    assert four.flops_per_step_per_gpu == pytest.approx(4 * one.flops_per_step_per_gpu, rel=1e-3)
    assert four.compute_s == pytest.approx(4 * one.compute_s, rel=1e-3)
    assert four.memory.activations > 2 * one.memory.activations


def test_checkpointing_adds_recomputation_and_saves_activations(cache_dir, one_thread):
    plain, ckpt = (plan.make_plan(tiny(cache_dir, 2, f"model.unet.gradient_checkpointing={on}",
                                       f"model.llm.gradient_checkpointing={on}"), A100) for on in ("false", "true"))
    for part in ("llm", "unet"):
        p, c = plain.flops_per_sample[part], ckpt.flops_per_sample[part]
        assert (p.forward, p.backward, p.recompute) == (c.forward, c.backward, 0)
        assert 0 < c.recompute <= c.forward, part
    assert ckpt.memory.activations < plain.memory.activations
    assert ckpt.activations_per_sample == plain.activations_per_sample  # the same traces, configured differently


def test_model_states_per_gpu_fall_with_more_gpus(cache_dir, one_thread):
    cfg = tiny(cache_dir, 3)
    small, big = (plan.make_plan(cfg, plan.Setup(nodes=n, gpus_per_node=2, gpu="a100-40gb")) for n in (1, 4))
    for key in ("trainable_states", "frozen_states"):
        assert getattr(big.memory, key) < getattr(small.memory, key), key
    assert big.global_batch == 4 * small.global_batch
    assert big.flops_per_sample == small.flops_per_sample


@pytest.mark.parametrize("argv,message", [
    ([], "the following arguments are required: --stage"),
    (["--stage", "2", "--config", "configs/stage1_pretrain.yaml"], "config error: model.lora"),
    (["--stage", "2", "--precomputed", "latents+text"], "only stage 1 can use precomputed text features"),
    (["--stage", "1", "--mfu", "0"], "config error: --mfu 0.0"),
    (["--stage", "1", "--config", "nowhere.yaml"], "config error: --config: file nowhere.yaml does not exist")])
def test_bad_input_is_named(argv, message, cache_dir, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    try:
        code = main(["plan", *argv, "--nodes", "1", "--gpu", "a100-40gb", f"data.cache_dir={cache_dir}"])
    except SystemExit as e:  # argparse
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("stage,precision,overrides", [(1, "fp32", []), (3, "bf16", ["model.projection=true"])])
def test_planned_model_state_memory_matches_two_real_ranks(three_stages, cache_dir, stage, precision, overrides,
                                                           one_thread):
    """Against the bytes each rank of the shared 2-rank run held after its first step (ranks/rank<r>.json):
    stage 1 in fp32 (UNet trained, LLM frozen), stage 3 in bf16 (LoRA, projection and UNet trained, EMA)."""
    run_dir, _ = three_stages
    measured = [json.loads((run_dir / f"stage{stage}" / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in measured] == [2, 2] and measured[0]["precision"] == precision
    cfg = load_config(stage, None, [f"data.cache_dir={cache_dir}", f"train.precision={precision}", *overrides])
    p = plan.make_plan(cfg, A100)
    estimate = p.memory.trainable_states + p.memory.frozen_states
    for rank in measured:
        state = rank["model_state_bytes"]
        assert abs(estimate - state["total"]) <= 0.2 * state["total"], (stage, precision, estimate, state)
        # and the planner counted (and froze) the same parameters DeepSpeed sharded
        assert p.inv.trainable == state["numel_trainable"] and p.inv.frozen == state["numel_frozen"]


def test_real_scale_stage1_plan_on_64_nodes(capsys, one_thread):
    code = main(["plan", "--stage", "1", "--config", str(REPO / "configs" / "stage1_pretrain.yaml"), "--nodes", "64",
                 "--gpus-per-node", "8", "--gpu", "h100-80gb"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "stage 1, 64 node(s) x 8 h100-80gb" in out and "= 512 GPUs, bf16" in out
    assert "LLM 6.61B frozen; UNet 2.90B trained" in out
    llm, vae, unet = (re.search(rf"{name} +forward +([\d.]+) T", out) for name in ("LLM", "VAE encode", "UNet"))
    assert 6.6 < float(llm.group(1)) < 7.0 and float(vae.group(1)) > 1 and float(unet.group(1)) > 1, out
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
