"""The trainer in this process (one rank, ZeRO-3): it learns, and the stages hand over exactly."""
import pytest
import torch
from safetensors.torch import load_file

from para_train.config import load_config
from para_train.models.tiny import tiny_llama_dir
from para_train.files import model_weights as weights
from para_train.training.distributed import init_process_group, read_env


@pytest.fixture(scope="module")
def dist_env():
    env = read_env()
    init_process_group(env)
    torch.set_num_threads(2)
    return env


class StageRun:
    """para_train.main.run_stage, a part at a time."""

    def __init__(self, cfg, dist_env):
        from para_train.main import open_stage
        from para_train.training.loop import Trainer

        self.stage, self.state = open_stage(cfg, dist_env)
        self.trainer = Trainer(self.stage, self.state)

    def train(self):
        from para_train.main import finish

        self.trainer.train()
        finish(self.stage, self.state)

    def close(self):
        self.stage.close()


def make_trainer(dist_env, stage, run_dir, cache_dir, *overrides):
    cfg = load_config(stage, overrides=[f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", "data.synthetic_samples=64",
                                        "sample.num_images=2", "sample.steps=3", "tracking.enabled=false",
                                        "checkpoint.every=1000", "eval.every=0", *overrides])
    return StageRun(cfg, dist_env)


def gathered(trainer, keep):
    return weights.gather_full(trainer.stage.model, 0, keep=keep)


def test_training_on_one_fixed_batch_drives_the_loss_down(dist_env, tmp_path, cache_dir):
    tr = make_trainer(dist_env, 1, tmp_path, cache_dir, "train.lr=0.001", "train.warmup_steps=1", "train.steps=1000",
                      "train.lr_schedule=constant", "data.caption_dropout=0.0")
    batch = next(tr.trainer.batches())
    gen_state = tr.stage.gen.get_state()
    losses = []
    for _ in range(40):
        tr.stage.gen.set_state(gen_state)  # same noise and timesteps every time: only the weights change
        loss = tr.trainer.forward(batch)
        tr.stage.engine.backward(loss)
        tr.stage.engine.step()
        losses.append(loss.item())
    tr.close()
    assert losses[-1] < 0.5 * losses[0], losses


def test_stages_hand_over_exactly(dist_env, tmp_path, cache_dir):
    """Stage 1 (fp32) -> stage 2 (bf16, from stage 1's EMA) -> stage 3 (fp32, from stage 2's raw weights): each
    stage's fp32 master weights start equal to the previous stage's fp32 weights, bit for bit."""
    from deepspeed.utils import safe_get_local_fp32_param

    is_llm_base = lambda n, p: n.startswith("text_encoder.llm.") and "lora_" not in n  # noqa: E731
    is_unet = lambda n, p: n.startswith("unet.")  # noqa: E731
    is_lora = lambda n, p: "lora_" in n  # noqa: E731
    llm_file = load_file(str(tiny_llama_dir(cache_dir) / "model.safetensors"))

    def llm_base_matches_file(sd, dtype=torch.float32):
        assert sd, "no LLM weights gathered"
        for name, t in sd.items():
            key = name.removeprefix("text_encoder.llm.").removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(t, llm_file[key].to(dtype).float()), f"LLM weight {name} changed"

    # Stage 1: UNet trains, LLM untouched.
    tr = make_trainer(dist_env, 1, tmp_path, cache_dir, "train.steps=3", "train.ema_decay=0.5")
    unet_before = gathered(tr, is_unet)
    tr.train()
    llm_base_matches_file(gathered(tr, is_llm_base))
    unet_after = gathered(tr, is_unet)
    assert any(not torch.equal(unet_before[k], unet_after[k]) for k in unet_before)
    assert (tmp_path / "stage1" / "config.yaml").is_file()
    tr.close()
    stage1_ema = load_file(str(tmp_path / "stage1" / "final" / "ema.safetensors"))
    assert any(not torch.equal(stage1_ema[k], v) for k, v in unet_after.items())  # the EMA is not the raw weights

    # Stage 2 in bf16 starts from stage 1's EMA (checkpoint.init_weights=ema, the default): the optimizer's fp32
    # master copy holds it exactly, not its bf16 rounding. It trains LoRA + UNet; the frozen LLM base stays
    # the file's weights (in bf16).
    tr = make_trainer(dist_env, 2, tmp_path, cache_dir, "train.steps=3", "train.precision=bf16", "train.ema_decay=0.5",
                      "model.llm.gradient_checkpointing=true",
                      "model.unet.gradient_checkpointing=true")  # LoRA grads must flow through checkpointed layers
    assert tr.stage.run.precision == "bf16"
    unet_start = gathered(tr, is_unet)  # trainable tensors come from the fp32 master
    assert unet_start.keys() == {k for k in stage1_ema if k.startswith("unet.")}
    for k, v in unet_start.items():
        assert torch.equal(v, stage1_ema[k]), k
    lora_before = gathered(tr, is_lora)
    assert lora_before and all(torch.count_nonzero(v) == 0 for k, v in lora_before.items() if "lora_B" in k)
    tr.train()
    lora_after = gathered(tr, is_lora)
    assert all(torch.count_nonzero(v) > 0 for k, v in lora_after.items() if "lora_B" in k), "LoRA B did not train"
    unet_end = gathered(tr, is_unet)
    assert any(not torch.equal(unet_start[k], unet_end[k]) for k in unet_start)
    llm_base_matches_file(gathered(tr, is_llm_base), torch.bfloat16)
    # the EMA follows the fp32 master (the optimizer's own tensors), not the bf16 parameters
    for src, p in zip(tr.stage.ema.sources, tr.stage.ema.params):
        assert src.data_ptr() == safe_get_local_fp32_param(p).data_ptr()
    tr.close()
    final = tmp_path / "stage2" / "final"
    stage2_ema = load_file(str(final / "ema.safetensors"))
    assert any(not torch.equal(v, v.bfloat16().float()) for v in stage2_ema.values()), "the EMA was rounded to bf16"
    raw = load_file(str(final / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(raw[k.removeprefix("unet.")], v) for k, v in unet_end.items())  # the fp32 master, saved

    # Stage 3 with checkpoint.init_weights=raw starts from exactly stage 2's final fp32 weights (UNet and LoRA).
    tr = make_trainer(dist_env, 3, tmp_path, cache_dir, "train.steps=1", "checkpoint.init_weights=raw")
    start = gathered(tr, lambda n, p: p.requires_grad)
    for k, v in unet_end.items():
        assert torch.equal(start[k], v), k
    for k, v in lora_after.items():
        assert torch.equal(start[k], v), k
    adapter = load_file(str(final / "lora" / "adapter_model.safetensors"))
    assert len(adapter) == len(lora_after) and all(v.numel() > 0 for v in adapter.values())
    tr.close()


# ---------------------------------------------------------------- starting from pretrained folders

# A tiny UNet with the keys SDXL's unet/config.json has: linear projections, per-block transformer depth,
# cross-attention over 2048-wide text (here 64) and the "text_time" micro-conditioning embedding.
SDXL_LIKE = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64], layers_per_block=1,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], transformer_layers_per_block=[1, 2],
                 attention_head_dim=[4, 8], cross_attention_dim=64, use_linear_projection=True, norm_num_groups=16,
                 addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=112)


def test_stage1_starts_from_an_sdxl_layout_unet_with_config_overrides(dist_env, tmp_path, cache_dir):
    import json

    from diffusers import UNet2DConditionModel

    from para_train.config import ConfigError

    torch.manual_seed(7)
    folder = tmp_path / "sdxl" / "unet"
    UNet2DConditionModel(**SDXL_LIKE).save_pretrained(str(folder))  # config.json + diffusion_pytorch_model.safetensors
    source = load_file(str(folder / "diffusion_pytorch_model.safetensors"))

    # SDXL's added-condition embedding is not fed by ParaDiffusion: a config error that says how to drop it
    with pytest.raises(ConfigError, match="model.unet.config.addition_embed_type: .*set model.unet.config.addition"):
        make_trainer(dist_env, 1, tmp_path / "run0", cache_dir, f"model.unet.path={folder}")

    overrides = json.dumps({"cross_attention_dim": 128, "addition_embed_type": None})  # the tiny LLM's width
    tr = make_trainer(dist_env, 1, tmp_path / "run", cache_dir, f"model.unet.path={folder}",
                      f"model.unet.config={overrides}", "train.steps=1")
    assert tr.stage.model.unet.config.cross_attention_dim == 128 and tr.stage.model.unet.config.addition_embed_type is None
    assert tr.stage.model.unet.config.transformer_layers_per_block == [1, 2]  # the rest comes from the folder
    unet = gathered(tr, lambda n, p: n.startswith("unet."))
    widened = {k for k in source if ".attn2.to_k." in k or ".attn2.to_v." in k}
    assert len(widened) == 16  # 8 transformer blocks (2 down, 2 mid, 4 up) x (to_k, to_v), no biases
    for k, v in source.items():
        if k.startswith("add_embedding."):
            assert "unet." + k not in unet  # dropped with addition_embed_type
        elif k in widened:
            assert unet["unet." + k].shape[1] == 128 and v.shape[1] == 64  # re-initialised at the new width
        else:
            assert torch.equal(unet["unet." + k], v), k  # copied exactly
    report = tr.stage.init_report
    assert report["init.unet.reinitialised"].startswith(f"{len(widened)}: ")
    assert report["init.unet.dropped"] == "4: add_embedding (4)"
    assert report["init.unet.copied"].startswith(f"{len(source) - len(widened) - 4}: ")
    assert report["init.unet.fresh"] == "0"
    tr.train()  # and it trains
    tr.close()

    # ... or keeps SDXL's micro-conditioning: a pooled text vector (128 wide here) plus 6 size/crop ids
    tr = make_trainer(dist_env, 1, tmp_path / "run_micro", cache_dir, f"model.unet.path={folder}",
                      f"model.unet.config={json.dumps({'cross_attention_dim': 128})}", "model.unet.micro_conditioning=true",
                      "train.steps=1")
    assert tr.stage.model.unet.config.addition_embed_type == "text_time"
    assert tr.stage.model.unet.config.projection_class_embeddings_input_dim == 128 + 6 * 8
    unet = gathered(tr, lambda n, p: n.startswith("unet."))
    assert unet["unet.add_embedding.linear_1.weight"].shape[1] == 176 != source["add_embedding.linear_1.weight"].shape[1]
    assert torch.equal(unet["unet.add_embedding.linear_2.weight"], source["add_embedding.linear_2.weight"])
    assert "add_embedding (3)" in tr.stage.init_report["init.unet.copied"]  # linear_1.bias, linear_2.weight and .bias
    tr.train()  # trains, samples (the sample grid goes through the same added conditions) and exports
    tr.close()
    from para_train.inference.pipeline import ParaDiffusionPipeline

    pipe = ParaDiffusionPipeline.from_pretrained(tmp_path / "run_micro" / "stage1" / "export")
    [image] = pipe(["A red circle on a blue background."], num_inference_steps=2, seed=0).images
    assert image.size == (32, 32)


def test_stage2_starts_from_a_folder_in_paradiffusions_layout(dist_env, tmp_path, cache_dir):
    """unet/ + text_encoder_lora/ (a peft adapter of the causal LM, as ParaDiffusion published its weights)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, LlamaForCausalLM

    from para_train.config import TINY_UNET

    torch.manual_seed(11)
    released = tmp_path / "ParaDiffusion"
    UNet2DConditionModel(**TINY_UNET).save_pretrained(str(released / "unet"))
    llm = LlamaForCausalLM(AutoConfig.from_pretrained(str(tiny_llama_dir(cache_dir))))
    peft = get_peft_model(llm, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained adapter: B is not zero
    peft.save_pretrained(str(released / "text_encoder_lora"))
    adapter = load_file(str(released / "text_encoder_lora" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.layers.") for k in adapter)  # the causal LM's names
    unet_file = load_file(str(released / "unet" / "diffusion_pytorch_model.safetensors"))

    tr = make_trainer(dist_env, 2, tmp_path / "run", cache_dir, f"checkpoint.init_from={released}", "train.steps=1")
    lora = gathered(tr, lambda n, p: "lora_" in n)
    assert len(lora) == len(adapter) > 0
    for name, v in lora.items():
        key = name.removeprefix("text_encoder.llm.").replace("base_model.model.", "base_model.model.model.", 1)
        assert torch.equal(v, adapter[key.replace(".default.", ".")]), name
    unet = gathered(tr, lambda n, p: n.startswith("unet."))
    assert all(torch.equal(unet["unet." + k], v) for k, v in unet_file.items())
    tr.train()
    tr.close()


def test_resume_on_a_different_number_of_ranks(dist_env, three_stages, tmp_path, cache_dir):
    """2 ranks (the shared run's stage 1) -> 1 rank (here) -> 2 ranks, through DeepSpeed's universal checkpoints."""
    import shutil

    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from conftest import STAGE1_TRAINING, STEPS, common_args, read_metrics, run_deepspeed

    run_dir, _ = three_stages
    two_rank = run_dir / "stage1" / "checkpoints" / f"step_{STEPS:08d}"
    (tmp_path / "stage1" / "checkpoints").mkdir(parents=True)
    shutil.copytree(two_rank, tmp_path / "stage1" / "checkpoints" / two_rank.name)
    shutil.copy(run_dir / "stage1" / "metrics.jsonl", tmp_path / "stage1" / "metrics.jsonl")
    args = common_args(tmp_path, cache_dir, None) + STAGE1_TRAINING
    more = STEPS + 2

    tr = make_trainer(dist_env, 1, tmp_path, cache_dir, *args, f"train.steps={more}")
    universal = tmp_path / "stage1" / "checkpoints" / f"universal_{two_rank.name}"
    assert tr.state.step == STEPS and (universal / "zero").is_dir()
    names = [n for n, p in tr.stage.model.named_parameters() if p.requires_grad]
    assert len(names) > 20
    for name, p in tr.stage.model.named_parameters():
        if not p.requires_grad:
            continue
        saved = universal / "zero" / name
        flat = lambda f: torch.load(saved / f, weights_only=True).reshape(-1)  # noqa: E731
        assert torch.equal(safe_get_full_fp32_param(p).reshape(-1), flat("fp32.pt")), name
        for key in ("exp_avg", "exp_avg_sq"):
            got = safe_get_full_optimizer_state(p, key).reshape(-1)
            assert got.abs().sum() > 0 and torch.equal(got, flat(f"{key}.pt")), (name, key)
    tr.train()  # training continues on one rank
    after_one_rank = gathered(tr, lambda n, p: n.startswith("unet."))
    tr.close()
    assert [r["step"] for r in read_metrics(tmp_path / "stage1")] == list(range(1, more + 1))

    # back to two ranks: the weights loaded there equal the one-rank weights exactly
    out = run_deepspeed(1, args + [f"train.steps={more}", "checkpoint.resume=" + str(tmp_path / "stage1" / "checkpoints" /
                                                                                     f"step_{more:08d}")])
    assert "resumed on 2 ranks from a checkpoint of 1 ranks" in out.stdout + out.stderr
    final = load_file(str(tmp_path / "stage1" / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    for k, v in final.items():
        assert torch.equal(v, after_one_rank["unet." + k]), k


def test_the_ema_decay_warms_up_as_diffusers_does():
    """min(decay, (1 + n) / (10 + n)) at the n-th update (diffusers' EMAModel): a short stage's EMA follows its
    training instead of staying near its first weights; a resumed EMA continues the warm-up where it stopped."""
    from para_train.training.ema import ShardedEMA

    p = torch.nn.Parameter(torch.zeros(3))
    ema = ShardedEMA([("w", p)], decay=0.999)
    expected = torch.zeros(3)
    for n in range(50):
        p.data.fill_(float(n + 1))
        d = 0.0 if n == 0 else min(0.999, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * p.data
        ema.update()
    torch.testing.assert_close(ema.shadow[0], expected)
    assert ema.shadow[0][0] > 0.75 * 50  # a flat 0.999 would leave it near 1.2
    resumed = ShardedEMA([("w", p)], decay=0.999)
    resumed.load_state_dict(ema.state_dict())
    assert resumed.updates == 50 and resumed.current_decay() == ema.current_decay() == min(0.999, 51 / 60)
