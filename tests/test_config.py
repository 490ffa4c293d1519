"""Config: bad input fails early with a message naming the key and the fix; real-scale configs build."""
import subprocess
import sys

import pytest
import torch

from para_train.config import REPO_ROOT, ConfigError, load_config
from para_train.models.pretrained import resolve_init_from

from conftest import MAIN, rank_env


def test_defaults_are_the_tiny_stage_configs():
    s1, s2, s3 = (load_config(s) for s in (1, 2, 3))
    assert not s1.model.lora.enabled and s2.model.lora.enabled and s3.model.lora.enabled
    assert s3.train.lr < s2.train.lr
    assert s1.model.llm.max_length == 512 and s1.data.caption_dropout == pytest.approx(0.1)


def test_training_and_sampling_share_the_zero_terminal_snr_schedule():
    """The tiny default trains on a schedule whose last timestep is pure noise, and its sampler (the one exported)
    starts there, on the same alphas; the real-scale configs keep SDXL's scaled-linear schedule."""
    from para_train.models.paradiffusion import noise_scheduler
    from para_train.sampling import make_scheduler

    m = load_config(1).model
    train = noise_scheduler(m.num_train_timesteps, m.prediction_type, m.zero_terminal_snr).alphas_cumprod
    sampler = make_scheduler(m.num_train_timesteps, m.prediction_type, m.zero_terminal_snr)
    # one schedule, bit for bit; at t=999 the sampler keeps 2**-24 instead of 0 (diffusers' guard against an
    # infinite sigma), the training forward process has exactly pure noise there
    assert train[-1] == 0.0 and sampler.alphas_cumprod[-1] == 2.0 ** -24
    assert torch.equal(train[:-1], sampler.alphas_cumprod[:-1])
    sampler.set_timesteps(10)
    assert int(sampler.timesteps[0]) == m.num_train_timesteps - 1
    sd = noise_scheduler(1000).alphas_cumprod
    assert sd[-1] > 0.004  # SD's schedule leaves ~7% of the signal's amplitude at t=999
    for name, stage in (("stage1_pretrain", 1), ("stage3_quality", 3)):
        real = load_config(stage, str(REPO_ROOT / "configs" / f"{name}.yaml")).model
        assert (real.prediction_type, real.zero_terminal_snr) == ("epsilon", False)


def test_overrides_are_typed_and_dotted():
    cfg = load_config(1, overrides=["train.steps=7", "train.lr=1e-3", "model.llm.layer=-2", "data.shuffle=false"])
    assert (cfg.train.steps, cfg.train.lr, cfg.model.llm.layer, cfg.data.shuffle) == (7, 0.001, -2, False)


def test_a_dotted_override_changes_one_entry_of_a_mapping():
    """model.unet.config.cross_attention_dim=48 is the tiny UNet with a narrower text input, not a UNet of
    diffusers' defaults; on a YAML's UNet config or a folder's (model.unet.path) it changes that one key too."""
    from para_train.config import TINY_UNET

    cfg = load_config(1, overrides=["model.unet.config.cross_attention_dim=48"])
    assert cfg.model.unet.config == {**TINY_UNET, "cross_attention_dim": 48}
    real = load_config(1, str(REPO_ROOT / "configs" / "stage1_pretrain.yaml"))
    cfg = load_config(1, str(REPO_ROOT / "configs" / "stage1_pretrain.yaml"), ["model.unet.config.sample_size=64"])
    assert cfg.model.unet.config == {**real.model.unet.config, "sample_size": 64}
    cfg = load_config(1, overrides=["model.unet.path=/sdxl/unet", "model.unet.config.cross_attention_dim=4096"])
    assert cfg.model.unet.config == {"cross_attention_dim": 4096}  # over the folder's config.json


@pytest.mark.parametrize("overrides, message", [
    (["train.stepz=3"], "train.stepz: unknown key; valid keys here are:"),
    (["train.steps=many"], "train.steps: expected an integer, got 'many'"),
    (["train.lr=-1"], "train.lr: must be > 0"),
    (["model.lora.enabled=true"], "stage 1 trains the UNet with a frozen LLM"),
    (["checkpoint.keep=1"], "checkpoint.keep: must be >= 2"),
    (["data.resolution=30"], "data.resolution: must be a multiple of 8"),
    (["kernels.lora=cuda"], "kernels.lora: must be one of auto, triton, torch; got 'cuda'"),
    (["data.crop=left"], "data.crop: must be one of center, random; got 'left'"),
    (["train.precision=null"], "train.precision: must be one of auto, fp32, bf16; got None"),
    (["deepspeed.zero_stage=true"], "deepspeed.zero_stage: must be one of 0, 1, 2, 3; got True"),
    (["deepspeed.zero_stage='2'"], "deepspeed.zero_stage: must be one of 0, 1, 2, 3; got '2'"),
    (["tracking.uri=/shared/mlruns"], "tracking.uri: '/shared/mlruns' is not a URI"),
    (["trainsteps"], "expected key=value"),
    (["tracking.log_every=0"], "tracking.log_every: must be >= 1"),
    (["model.prediction_type=epsilon"], "model.zero_terminal_snr: needs model.prediction_type=v_prediction"),
    (["checkpoint.resume=3"], "checkpoint.resume: expected one of auto, never or a string (e.g. a folder), got 3"),
])
def test_bad_overrides_name_the_key_and_fix(overrides, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(1, overrides=overrides)
    assert message in str(err.value)


def test_fixed_choices_are_literal_types_checked_on_load():
    """Every fixed-choice field is a typing.Literal, so `config.load._coerce` is the one place that checks them."""
    import dataclasses
    import typing

    from para_train.config import CAPTION_STYLES, Config, DataConfig

    def literals(cls, prefix=""):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                yield from literals(hint, f"{prefix}{f.name}.")
            elif typing.get_origin(hint) is typing.Literal:
                yield f"{prefix}{f.name}"

    assert set(literals(Config)) >= {
        "run.stage", "model.prediction_type", "data.synthetic_captions", "data.crop", "data.use_latents",
        "data.use_text_embeds", "train.lr_schedule", "train.precision", "checkpoint.init_weights",
        "deepspeed.zero_stage", "kernels.lora", "kernels.cross_attention"}
    assert CAPTION_STYLES == typing.get_args(typing.get_type_hints(DataConfig)["synthetic_captions"]) == ("paragraph", "short")
    cfg = load_config(1, overrides=["kernels.cross_attention=sdpa", "deepspeed.zero_stage=2", "data.crop=random"])
    assert (cfg.kernels.cross_attention, cfg.deepspeed.zero_stage, cfg.data.crop) == ("sdpa", 2, "random")


def test_stage2_without_lora_and_without_stage1_output(tmp_path):
    with pytest.raises(ConfigError, match="set model.lora.enabled=true"):
        load_config(2, overrides=["model.lora.enabled=false"])
    cfg = load_config(2, overrides=[f"run.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="Run stage 1 first"):
        resolve_init_from(cfg)
    cfg = load_config(3, overrides=[f"checkpoint.init_from={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match="nowhere does not exist"):
        resolve_init_from(cfg)


def test_config_file_stage_mismatch_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="is a stage 2 config but --stage 1"):
        (tmp_path / "c.yaml").write_text("run:\n  stage: 2\n")
        load_config(1, str(tmp_path / "c.yaml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(1, str(tmp_path / "missing.yaml"))


def test_cli_reports_config_errors_before_starting_ranks(tmp_path):
    proc = subprocess.run([sys.executable, str(MAIN), "--stage", "2", f"run.dir={tmp_path}"], env=rank_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "config error: checkpoint.init_from" in proc.stderr and "--stage 1" in proc.stderr
    assert not (tmp_path / "stage2").exists()  # nothing was started or written


@pytest.mark.parametrize("name, stage", [("stage1_pretrain", 1), ("stage2_alignment", 2), ("stage3_quality", 3)])
def test_real_scale_configs_validate_and_build_on_meta(name, stage):
    from transformers import LlamaConfig

    from para_train.models.build import build_llm, build_unet

    cfg = load_config(stage, str(REPO_ROOT / "configs" / f"{name}.yaml"))
    assert cfg.model.llm.config["hidden_size"] == cfg.model.unet.config["cross_attention_dim"] == 4096
    with torch.device("meta"):
        llm = build_llm(LlamaConfig(**cfg.model.llm.config))
        unet = build_unet(cfg.model.unet.config)
    n_llm = sum(p.numel() for p in llm.parameters())
    n_unet = sum(p.numel() for p in unet.parameters())
    assert 6.5e9 < n_llm < 6.8e9, n_llm  # Llama-2-7B is 6.74B; without its LM head 6.61B
    # SDXL's UNet is 2.57B at text width 2048; width 4096 widens every attn2 to_k/to_v: 2.91B.
    assert 2.5e9 < n_unet < 3.0e9, n_unet


def test_parts_that_do_not_fit_together_are_config_errors_before_any_rank_starts(cache_dir):
    """What used to fail only once every rank had built its model: a resolution the VAE and the UNet cannot
    divide down, an LLM wider than the UNet's cross-attention without a projection, a ZeRO-3 leaf module
    inside the LLM LoRA trains."""
    from para_train.models.build import check_architecture

    def check(stage, *overrides):
        check_architecture(load_config(stage, overrides=[f"data.cache_dir={cache_dir}", *overrides]))

    check(1)
    check(1, "deepspeed.leaf_modules=[LlamaDecoderLayer]")  # stage 1: the LLM is frozen, allowed
    with pytest.raises(ConfigError, match="data.resolution=40: the VAE and the UNet downsample by 16 together; use "
                                          "a multiple of 16"):
        check(1, "model.unet.config.block_out_channels=[32, 32, 64, 64]", "data.resolution=40")
    with pytest.raises(ConfigError, match="model.projection: the LLM width is .* but the UNet's cross_attention_dim "
                                          "is 48; set model.projection=true"):
        check(1, "model.unet.config.cross_attention_dim=48", "model.projection=false")
    with pytest.raises(ConfigError, match=r"deepspeed.leaf_modules: \['LlamaDecoderLayer'\] are LLM modules"):
        check(2, "deepspeed.leaf_modules=[LlamaDecoderLayer, Transformer2DModel]")


def test_weights_folders_are_checked_before_any_rank_starts(tmp_path):
    """Missing folders, folders without safetensors, a UNet of another architecture and a LoRA adapter of
    another rank are config errors that name the folder and the fix."""
    import json

    from para_train.config import TINY_UNET
    from para_train.models.pretrained import check_model_paths

    with pytest.raises(ConfigError,
                       match="model.llm.path: /no/such/llama is not a folder on this machine; .*no downloads"):
        check_model_paths(load_config(1, overrides=["model.llm.path=/no/such/llama"]))
    unet = tmp_path / "sdxl" / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text(json.dumps(TINY_UNET))
    (unet / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConfigError, match=r"model.unet.path: .*unet holds no .safetensors weights \(it has "
                                          r"\['diffusion_pytorch_model.bin'\]: convert them to safetensors"):
        check_model_paths(load_config(1, overrides=[f"model.unet.path={unet}"]))

    final = tmp_path / "final"
    (final / "unet").mkdir(parents=True)
    (final / "final.json").write_text("{}")
    (final / "unet" / "config.json").write_text(json.dumps({**TINY_UNET, "block_out_channels": [64, 128]}))
    (final / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"the UNet in .*final/unet has another architecture \(block_out_channels: "
                                          r"\[64, 128\] there, \[32, 64\] here\)"):
        resolve_init_from(load_config(3, overrides=[f"checkpoint.init_from={final}"]))
    (final / "unet" / "config.json").write_text(json.dumps(TINY_UNET))
    (final / "lora").mkdir()
    (final / "lora" / "adapter_config.json").write_text(json.dumps({"r": 64, "target_modules": ["q_proj", "v_proj"]}))
    (final / "lora" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"trained with other settings; set model.lora.rank=64 "
                                          r'model.lora.target_modules=\["q_proj", "v_proj"\]'):
        resolve_init_from(load_config(3, overrides=[f"checkpoint.init_from={final}"]))
    assert resolve_init_from(load_config(3, overrides=[f"checkpoint.init_from={final}", "model.lora.rank=64",
                                                       "model.lora.target_modules=[q_proj, v_proj]"])).kind == "final"
