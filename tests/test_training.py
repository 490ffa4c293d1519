"""The trainer in this process (one rank, ZeRO-3): it learns, and the stages hand over exactly."""
import pytest
import torch
from safetensors.torch import load_file

from para_train.config import load_config
from para_train.models.tiny import tiny_llama_dir
from para_train.training import weights
from para_train.training.distributed import init_process_group, read_env


@pytest.fixture(scope="module")
def dist_env():
    env = read_env()
    init_process_group(env)
    torch.set_num_threads(2)
    return env


def make_trainer(dist_env, stage, run_dir, cache_dir, *overrides):
    from para_train.training.trainer import Trainer

    cfg = load_config(stage, overrides=[f"run.dir={run_dir}", f"data.cache_dir={cache_dir}", "data.synthetic_samples=64",
                                        "sample.num_images=2", "sample.steps=3", "tracking.enabled=false",
                                        "checkpoint.every=1000", *overrides])
    return Trainer(cfg, dist_env)


def gathered(trainer, keep):
    return weights.gather_full(trainer.model, 0, keep=keep)


def test_training_on_one_fixed_batch_drives_the_loss_down(dist_env, tmp_path, cache_dir):
    tr = make_trainer(dist_env, 1, tmp_path, cache_dir, "train.lr=0.001", "train.warmup_steps=1", "train.steps=1000",
                      "train.lr_schedule=constant", "data.caption_dropout=0.0")
    batch = next(tr._batches())
    gen_state = tr.gen.get_state()
    losses = []
    for _ in range(40):
        tr.gen.set_state(gen_state)  # same noise and timesteps every time: only the weights change
        loss = tr._forward(batch)
        tr.engine.backward(loss)
        tr.engine.step()
        losses.append(loss.item())
    tr.close()
    assert losses[-1] < 0.5 * losses[0], losses


def test_stages_hand_over_exactly(dist_env, tmp_path, cache_dir):
    is_llm_base = lambda n, p: n.startswith("text_encoder.llm.") and "lora_" not in n  # noqa: E731
    is_unet = lambda n, p: n.startswith("unet.")  # noqa: E731
    is_lora = lambda n, p: "lora_" in n  # noqa: E731
    llm_file = load_file(str(tiny_llama_dir(cache_dir) / "model.safetensors"))

    def llm_base_matches_file(sd):
        assert sd, "no LLM weights gathered"
        for name, t in sd.items():
            key = name.removeprefix("text_encoder.llm.").removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(t, llm_file[key]), f"LLM weight {name} changed"

    # Stage 1: UNet trains, LLM untouched.
    tr = make_trainer(dist_env, 1, tmp_path, cache_dir, "train.steps=3")
    unet_before = gathered(tr, is_unet)
    tr.train()
    llm_base_matches_file(gathered(tr, is_llm_base))
    unet_after = gathered(tr, is_unet)
    assert any(not torch.equal(unet_before[k], unet_after[k]) for k in unet_before)
    assert (tmp_path / "stage1" / "config.yaml").is_file()
    tr.close()

    # Stage 2 starts from stage 1's final UNet, trains LoRA + UNet, leaves the LLM base bit-identical.
    tr = make_trainer(dist_env, 2, tmp_path, cache_dir, "train.steps=3", "model.llm.gradient_checkpointing=true",
                      "model.unet.gradient_checkpointing=true")  # LoRA grads must flow through checkpointed layers
    unet_start = gathered(tr, is_unet)
    stage1_unet = load_file(str(tmp_path / "stage1" / "final" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(unet_start["unet." + k], v) for k, v in stage1_unet.items())
    lora_before = gathered(tr, is_lora)
    assert lora_before and all(torch.count_nonzero(v) == 0 for k, v in lora_before.items() if "lora_B" in k)
    tr.train()
    lora_after = gathered(tr, is_lora)
    assert all(torch.count_nonzero(v) > 0 for k, v in lora_after.items() if "lora_B" in k), "LoRA B did not train"
    unet_end = gathered(tr, is_unet)
    assert any(not torch.equal(unet_start[k], unet_end[k]) for k in unet_start)
    llm_base_matches_file(gathered(tr, is_llm_base))
    tr.close()

    # Stage 3 starts from exactly stage 2's final weights (UNet and LoRA).
    tr = make_trainer(dist_env, 3, tmp_path, cache_dir, "train.steps=1")
    start = gathered(tr, lambda n, p: p.requires_grad)
    for k, v in unet_end.items():
        assert torch.equal(start[k], v), k
    for k, v in lora_after.items():
        assert torch.equal(start[k], v), k
    adapter = load_file(str(tmp_path / "stage2" / "final" / "lora" / "adapter_model.safetensors"))
    assert len(adapter) == len(lora_after) and all(v.numel() > 0 for v in adapter.values())
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
    assert tr.step == STEPS and (universal / "zero").is_dir()
    names = [n for n, p in tr.model.named_parameters() if p.requires_grad]
    assert len(names) > 20
    for name, p in tr.model.named_parameters():
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


def test_llm_leaf_modules_are_refused_while_lora_trains(dist_env, tmp_path, cache_dir):
    from para_train.config import ConfigError

    with pytest.raises(ConfigError, match=r"deepspeed.leaf_modules: \['LlamaDecoderLayer'\] are LLM modules"):
        make_trainer(dist_env, 2, tmp_path, cache_dir, "deepspeed.leaf_modules=[LlamaDecoderLayer]",
                     "checkpoint.init_from=none")
