"""Every key of the config: its section, type, default and check (what `--config` YAML files and `key=value`
overrides may set), the fixed choices as `Literal` types and the stage defaults."""
from __future__ import annotations

import dataclasses
import importlib.util
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse


REPO_ROOT = Path(__file__).resolve().parents[2]


class ConfigError(ValueError):
    """A user-fixable problem in the configuration."""


def require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


# Fixed-choice fields are typed with these; `load._coerce` checks a YAML/CLI value against the choices once, for all.
Stage = Literal[1, 2, 3]
PredictionType = Literal["epsilon", "v_prediction"]
CaptionStyle = Literal["paragraph", "short"]
Crop = Literal["center", "random"]
UsePrecomputed = Literal["auto", "always", "never"]
LRSchedule = Literal["cosine", "linear", "constant"]
Precision = Literal["auto", "fp32", "bf16"]
InitWeights = Literal["ema", "raw"]
ZeroStage = Literal[0, 1, 2, 3]
LoraKernel = Literal["auto", "triton", "torch"]
CrossAttentionKernel = Literal["auto", "triton", "flash_attn", "sdpa"]
# Fields where a few words stand beside a folder: the words are spelled out here, any other string is a path.
TINY = "tiny"  # the stand-in the project generates (models.tiny)
ModelPath = Literal["tiny"] | str
ResumeFrom = Literal["auto", "never"] | str  # or a checkpoint folder
InitFrom = Literal["auto", "none"] | str  # or a weights folder


@dataclass
class RunConfig:
    dir: str = "runs/default"  # every stage of one training writes under this folder
    seed: int = 0
    stage: Stage = 1  # set by --stage
    # Bitwise-reproducible GPU runs (a resumed run's losses equal an uninterrupted one's there too), at some
    # speed: torch's deterministic algorithms, cuBLAS's fixed workspace, no cuDNN autotuning. The CPU is
    # deterministic either way.
    deterministic: bool = False


@dataclass
class LLMConfig:
    # A local folder or hub id with config + weights + tokenizer (e.g. meta-llama/Llama-2-7b-hf, supplied
    # by you), or "tiny": a small Llama the project generates (pretrained briefly on synthetic paragraphs) into
    # data.cache_dir.
    path: ModelPath | None = TINY
    # Architecture (transformers config kwargs). Used to build the model when no path is given, and
    # by `para-train plan` / meta-device builds. With a path, the path's config.json wins.
    config: dict | None = None
    layer: int = -1  # which hidden state feeds the UNet: -1 last (ParaDiffusion), -2 penultimate (Kolors)
    max_length: int = 512  # text tokens; prompts are padded to this and the attention mask is kept
    gradient_checkpointing: bool = False

    def __post_init__(self):
        require(self.path is not None or self.config is not None, "model.llm",
               "set model.llm.path (weights folder or hub id) or model.llm.config (architecture)")
        require(self.layer < 0, "model.llm.layer", f"must be negative (-1 last, -2 penultimate), got {self.layer}")
        require(1 <= self.max_length <= 8192, "model.llm.max_length", f"must be in 1..8192, got {self.max_length}")


@dataclass
class LoRAConfig:
    enabled: bool = False  # stage 1: off (frozen LLM); stages 2-3: on
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self):
        require(self.rank >= 1, "model.lora.rank", f"must be >= 1, got {self.rank}")
        require(0.0 <= self.dropout < 1.0, "model.lora.dropout", f"must be in [0, 1), got {self.dropout}")
        require(len(self.target_modules) > 0, "model.lora.target_modules",
               "name at least one module, e.g. [q_proj, v_proj]")


TINY_UNET = {  # 16x16x4 latents (the tiny VAE at 32 px)
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 128,
    "attention_head_dim": 2,  # diffusers' legacy name: 2 heads of 16-32 dims (8 heads of 4-8 trained 1.45x slower)
    "norm_num_groups": 16,
}


@dataclass
class UNetConfig:
    path: str | None = None  # a pretrained UNet2DConditionModel folder (e.g. SDXL's unet/); None = from `config`
    # UNet2DConditionModel kwargs. Without a path: the whole architecture (default: the tiny embedded UNet).
    # With a path: keys that override the folder's config.json, e.g. to start from SDXL's unet/ with a
    # Llama-2-wide text input: {cross_attention_dim: 4096, addition_embed_type: null}. Tensors whose shape
    # still matches are copied from the folder; the others start fresh (the log and MLflow list which).
    config: dict | None = None
    gradient_checkpointing: bool = False
    # Keep SDXL's micro-conditioning (addition_embed_type: text_time) instead of dropping it: the UNet also gets
    # a pooled text vector (the text features at the paragraph's last token, as Kolors pools its LLM) and the
    # size/crop ids. Its input width becomes cross_attention_dim + 6 * addition_time_embed_dim, so the first
    # layer of SDXL's add_embedding starts fresh and the rest is copied.
    micro_conditioning: bool = False

    def __post_init__(self):
        if self.config is None:
            self.config = {} if self.path is not None else dict(TINY_UNET)


@dataclass
class VAEConfig:
    # An AutoencoderKL folder (e.g. madebyollin/sdxl-vae-fp16-fix, supplied by you) or "tiny": a small VAE
    # (2x downsampling) the project trains on synthetic scenes when first built. Frozen in every stage.
    path: ModelPath = TINY


@dataclass
class ModelConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    projection: bool = False  # a trained linear map from the LLM width to the UNet's cross_attention_dim
    # The tiny default: v-prediction on a zero-terminal-SNR schedule with plain MSE. The real-scale stage configs
    # keep SDXL's epsilon-prediction, its scaled-linear schedule and min-SNR 5 (they start from SDXL's UNet).
    prediction_type: PredictionType = "v_prediction"
    # SD's scaled-linear betas rescaled so that the last timestep is pure noise (Lin et al. 2024, "Common diffusion
    # noise schedules and sample steps are flawed"; diffusers' rescale_betas_zero_snr). Without it the t=999 latent
    # still holds the image's low frequencies, so the model reads the background from the noise rather than from
    # the paragraph, and samples (which start from pure noise) come out with the wrong, blotchy backgrounds.
    zero_terminal_snr: bool = True
    min_snr_gamma: float | None = None  # min-SNR loss weighting (Hang et al. 2023), e.g. 5.0; null = plain MSE
    num_train_timesteps: int = 1000

    def __post_init__(self):
        require(self.min_snr_gamma is None or self.min_snr_gamma > 0, "model.min_snr_gamma", "must be > 0 or null")
        require(not self.zero_terminal_snr or self.prediction_type == "v_prediction", "model.zero_terminal_snr",
               "needs model.prediction_type=v_prediction: at zero SNR the noisy latent is the noise itself, so an "
               "epsilon-prediction model learns nothing there; set prediction_type=v_prediction or "
               "zero_terminal_snr=false")


@dataclass
class StreamConfig:
    """One source of MDS shards in a mix (MosaicML streaming's `Stream`). Give at most one weight:
    all streams relative (`proportion`) or all absolute (`repeat` / `choose`); none = each sample once."""
    remote: str  # a local folder of MDS shards (read in place) or a URL such as s3://bucket/prefix
    proportion: float | None = None  # this stream's share of every epoch
    repeat: float | None = None  # how many times each of its samples is seen per epoch (0.5 = half of them)
    choose: int | None = None  # how many of its samples are drawn per epoch

    def __post_init__(self):
        weights = [w for w in (self.proportion, self.repeat, self.choose) if w is not None]
        require(len(weights) <= 1, "data.streams[].proportion",
               f"stream {self.remote}: give at most one of proportion, repeat, choose")
        require(all(w >= 0 for w in weights), "data.streams[].proportion",
               f"stream {self.remote}: weights must be >= 0")


CAPTION_STYLES = typing.get_args(CaptionStyle)  # data.synthetic_captions (para_train.scenes.synthetic)


@dataclass
class DataConfig:
    # MDS shards (written by `para-train data convert`): a local folder or s3://bucket/prefix (any
    # scheme MosaicML streaming supports). None (and no streams) = the synthetic paragraph-scene set,
    # generated on first use into cache_dir.
    remote: str | None = None
    # Or a weighted mix of several shard sets, e.g. stage 1's pretrain mix:
    #   [{remote: s3://b/laion-mds, proportion: 0.7}, {remote: s3://b/cc12m-mds, proportion: 0.3}]
    streams: list[StreamConfig] | None = None
    epoch_size: int | None = None  # samples per epoch over all streams; None = their natural size
    cache_dir: str = "~/.cache/para-train"  # remote shards are cached under cache_dir/streams/
    # Remote shards kept on the local disk at once, e.g. "500gb": the least recently used are deleted
    # above it, so one epoch of 0.3B samples never fills the disk. None = keep everything.
    cache_limit: str | None = None
    download_retry: int = 3
    download_timeout: float = 120.0  # seconds per shard file
    validate_hash: str | None = "xxh64"  # checked on every downloaded shard (convert writes sha1 + xxh64)
    synthetic_samples: int = 2000
    synthetic_seed: int = 0
    # The synthetic set's captions: paragraph (100-400 words) or short (alt-text length, every object named;
    # stage 1's default, as ParaDiffusion pretrains on short captions before the paragraph stages)
    synthetic_captions: CaptionStyle = "paragraph"
    resolution: int = 32  # shorter side resized to this, then a square crop
    crop: Crop = "center"
    flip: bool = False  # random horizontal flips
    caption_dropout: float = 0.1  # empty-string captions for classifier-free guidance
    shuffle: bool = True
    # MosaicML streaming's shuffle unit. The sample order depends on it, and by default it is the
    # number of nodes of the run; set it (e.g. to the first run's node count) to keep the same order
    # when a run resumes on a different number of nodes. Nodes and it must divide one another.
    num_canonical_nodes: int | None = None
    num_workers: int = 0
    # Columns written by `para-train data precompute`: auto = use them when the shards hold them,
    # always = require them, never = ignore them. Text embeddings are for stage 1 only (frozen LLM).
    use_latents: UsePrecomputed = "auto"
    use_text_embeds: UsePrecomputed = "auto"
    max_skip_rate: float = 0.01  # stop when more than this fraction of samples are bad (undecodable, empty)
    # At start-up, remove MosaicML streaming's shared memory that a killed run left on the node: this user's
    # segments with streaming's names that no live process maps (live runs' segments are left alone)
    clean_shared_memory: bool = True

    def __post_init__(self):
        require(0.0 <= self.max_skip_rate <= 1.0, "data.max_skip_rate", f"must be in [0, 1], got {self.max_skip_rate}")
        require(0.0 <= self.caption_dropout < 1.0, "data.caption_dropout",
               f"must be in [0, 1), got {self.caption_dropout}")
        require(self.resolution >= 8 and self.resolution % 8 == 0, "data.resolution",
               f"must be a multiple of 8 (the VAE and the UNet each downsample by powers of 2), got {self.resolution}")
        require(self.synthetic_samples >= 1, "data.synthetic_samples", "must be >= 1")
        require(not (self.remote and self.streams), "data.streams",
               "set either data.remote (one shard set) or data.streams (a mix), not both")
        require(self.streams is None or len(self.streams) > 0, "data.streams", "list at least one stream, or use null")
        if self.streams:
            relative = [s.proportion is not None for s in self.streams]
            absolute = [s.repeat is not None or s.choose is not None for s in self.streams]
            require(not (any(relative) and any(absolute)), "data.streams",
                   "weight every stream by proportion (relative) or by repeat/choose (absolute), not a mix of both")
            require(not any(relative) or all(relative), "data.streams",
                   "with proportions, give every stream a proportion")
        require(self.epoch_size is None or self.epoch_size >= 1, "data.epoch_size", "must be >= 1 or null")
        require(self.download_retry >= 0, "data.download_retry", "must be >= 0")
        require(self.download_timeout > 0, "data.download_timeout", "must be > 0 seconds")
        require(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        require(self.num_canonical_nodes is None or self.num_canonical_nodes >= 1, "data.num_canonical_nodes",
               "must be >= 1 or null (the number of nodes)")
        require(self.cache_limit is None
               or re.fullmatch(r"\d+(\.\d+)?\s*([kmgtp]b|b)?", self.cache_limit.strip().lower()) is not None,
               "data.cache_limit", f"expected a size such as 500gb or 2tb, got {self.cache_limit!r}")

    def remotes(self) -> list[StreamConfig]:
        """The configured shard sets as streams; empty for the synthetic default."""
        if self.streams:
            return list(self.streams)
        return [StreamConfig(remote=self.remote)] if self.remote else []


@dataclass
class TrainConfig:
    steps: int = 500  # optimizer steps in this stage
    micro_batch_size: int = 8  # per rank
    grad_accum: int = 1
    lr: float = 1e-3
    lora_lr: float | None = None  # None = lr
    warmup_steps: int = 20
    lr_schedule: LRSchedule = "cosine"  # after warmup
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # 0 disables the EMA
    precision: Precision = "auto"  # auto: bf16 on GPU, fp32 on CPU
    max_consecutive_skips: int = 10  # stop after this many non-finite steps in a row
    log_every: int = 10

    def __post_init__(self):
        require(self.steps >= 1, "train.steps", f"must be >= 1, got {self.steps}")
        require(self.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
        require(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        require(self.lr > 0, "train.lr", "must be > 0")
        require(0.0 <= self.ema_decay < 1.0, "train.ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        require(len(self.betas) == 2, "train.betas", "give two numbers, e.g. [0.9, 0.999]")
        require(self.max_consecutive_skips >= 1, "train.max_consecutive_skips", "must be >= 1")


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between checkpoints (one is always written at the end)
    keep: int = 2  # complete checkpoints kept (>= 2 so a crash while writing leaves one)
    resume: ResumeFrom = "auto"  # auto (latest complete one in the stage dir, if any) | never | a checkpoint folder
    # Where this stage's weights come from: "auto" = the previous stage's final weights in run.dir
    # (stage 1: none), or a folder: a stage's final/, a `para-train export` folder, or a diffusers folder in
    # ParaDiffusion's released layout (unet/ + text_encoder_lora/); or "none".
    init_from: InitFrom = "auto"
    # Which of the previous stage's weights: "ema" (default) or "raw". The EMA is the smoothed model a
    # practitioner evaluates and releases, and the usual starting point of a fine-tune (SD, PixArt); sources
    # with one set of weights only (exports, released models, ema_decay=0) give theirs either way.
    init_weights: InitWeights = "ema"

    def __post_init__(self):
        require(self.every >= 1, "checkpoint.every", "must be >= 1")
        require(self.keep >= 2, "checkpoint.keep",
               f"must be >= 2 so a crash mid-write leaves a complete one, got {self.keep}")


@dataclass
class DeepSpeedSection:
    config: str = "configs/deepspeed/zero3_tiny.json"  # base DeepSpeed JSON (relative to the repo or absolute)
    zero_stage: ZeroStage = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    # Module classes ZeRO-3 gathers whole, with one fetch/release hook for the block instead of one per
    # layer inside it: far fewer hooks per step, at the cost of holding one block's weights at a time.
    # Names that match no module in the model are ignored; [] = DeepSpeed's per-layer hooks. Modules of the
    # LLM can be leaves only in stage 1 (DeepSpeed does not gather a leaf again for LoRA's backward).
    leaf_modules: list[str] = field(default_factory=lambda: ["ResnetBlock2D", "BasicTransformerBlock"])


@dataclass
class KernelsConfig:
    # auto = Triton on a GPU, PyTorch otherwise (para_train.kernel_dispatch)
    lora: LoraKernel = "auto"
    cross_attention: CrossAttentionKernel = "auto"


@dataclass
class TrackingConfig:
    """MLflow tracking (para_train.tracking)."""

    enabled: bool = True
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///RUN_DIR/mlflow.db
    experiment: str = "para-train"
    run_name: str | None = None
    log_every: int = 10  # metrics every N steps (the trainer honours this)
    sample_every: int = 0  # sample grids every M steps, 0 = only at the end (the trainer)
    # The exported model of each stage is uploaded as the run's `model/` artifact and registered as a
    # new version of this registered model, tagged with its stage: "auto" = the experiment's name,
    # "none" = neither (the export stays on disk only).
    registered_model: str = "auto"
    queue_size: int = 1000  # items waiting for MLflow; beyond it they go to the fallback file
    shutdown_timeout_s: float = 20.0  # close() waits at most this long for MLflow
    system_metrics: bool = False  # MLflow's CPU/GPU/disk/network monitor (needs psutil)

    def __post_init__(self):
        require(self.uri is None or len(urlparse(self.uri).scheme) >= 2, "tracking.uri",  # 'C:/x' has scheme 'c'
               f"{self.uri!r} is not a URI; use http://HOST:PORT for a tracking server, "
               "sqlite:///PATH/mlflow.db for a local store, or leave it unset")
        require(bool(self.experiment), "tracking.experiment", "empty; set a name, e.g. tracking.experiment=para-train")
        require(bool(self.registered_model.strip()), "tracking.registered_model",
               "empty; use auto (the experiment's name), none, or a name")
        for key, minimum in (("log_every", 1), ("sample_every", 0), ("queue_size", 1)):
            require(getattr(self, key) >= minimum, f"tracking.{key}", f"must be >= {minimum}, got {getattr(self, key)}")
        require(self.shutdown_timeout_s > 0, "tracking.shutdown_timeout_s",
               f"must be > 0 (e.g. 20), got {self.shutdown_timeout_s}")
        require(not self.system_metrics or importlib.util.find_spec("psutil") is not None, "tracking.system_metrics",
               "needs psutil; pip install psutil, or set it to false")

    @property
    def registered_model_name(self) -> str | None:
        return {"auto": self.experiment, "none": None}.get(self.registered_model, self.registered_model)


@dataclass
class SampleConfig:
    prompts: list[str] | None = None  # None = a fixed list of synthetic scene paragraphs
    num_images: int = 4
    steps: int = 20
    # 3 for the tiny default (its evaluation: background 0.60 at CFG 3, 0.32 at 7.5); the real-scale stage configs
    # set SDXL's 7.5
    guidance_scale: float = 3.0
    seed: int = 1234


@dataclass
class EvalConfig:
    """Validation during training (metrics val/loss, val/loss_t<T>, val/faithfulness/<check>)."""
    every: int = 100  # steps between validations; one also runs at the end of the stage. 0 = never
    # Held-out MDS shards (para-train data convert) for real data; null with the synthetic default = the scenes and
    # paragraphs of `para-train evaluate`'s set, which training never sees. Real data without it: no validation.
    remote: str | None = None
    num_samples: int = 16  # held-out pairs scored by the denoising loss
    timesteps: list[int] = field(default_factory=lambda: [100, 500, 900])  # fixed: the curve is comparable
    num_images: int = 4  # synthetic scenes: images sampled and scored for faithfulness (0 = none)
    sample_steps: int = 10
    seed: int = 0  # which held-out set, latents and noise

    def __post_init__(self):
        require(self.every >= 0, "eval.every", "must be >= 0 (0 = never)")
        require(self.num_samples >= 1, "eval.num_samples", "must be >= 1")
        require(len(self.timesteps) > 0, "eval.timesteps", "list at least one timestep, e.g. [100, 500, 900]")
        require(0 <= self.num_images <= self.num_samples, "eval.num_images",
               f"must be in 0..eval.num_samples ({self.num_samples}), got {self.num_images}: the images are sampled "
               "from the held-out pairs; lower eval.num_images or raise eval.num_samples")
        require(self.sample_steps >= 1, "eval.sample_steps", "must be >= 1")


@dataclass
class DebugConfig:
    """Fault injection for tests and drills; leave at the defaults in real runs."""
    nan_loss_at_step: int = -1  # make the loss NaN on one rank at this step (once)
    nan_loss_rank: int = 0
    kill_in_checkpoint_at_step: int = -1  # SIGKILL every rank while writing this step's checkpoint
    # SIGKILL rank `crash_rank` right after this step, as a lost node would end it; once per stage dir (a marker
    # file there lets the requeued attempt pass the step)
    crash_at_step: int = -1
    crash_rank: int = 0
    slow_finish_s: float = 0.0  # rank 0 spends this long more on the stage's export (a long upload, say)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def __post_init__(self):
        stage = self.run.stage
        bad = [t for t in self.eval.timesteps if not 0 <= t < self.model.num_train_timesteps]
        require(not bad, "eval.timesteps", f"{bad} outside 0..{self.model.num_train_timesteps - 1} "
                                          "(model.num_train_timesteps)")
        if stage == 1:
            require(not self.model.lora.enabled, "model.lora.enabled",
                   "stage 1 trains the UNet with a frozen LLM and no LoRA; set model.lora.enabled=false "
                   "or use --stage 2")
        else:
            require(self.model.lora.enabled, "model.lora.enabled",
                   f"stage {stage} trains LoRA on the LLM; set model.lora.enabled=true (with model.lora.rank etc.)")

    # ---- the data cache (a run's own paths: para_train.files.layout) ----
    @property
    def cache_dir(self) -> Path:
        return Path(self.data.cache_dir).expanduser()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Stage defaults sit between the dataclass defaults and the YAML file.
STAGE_DEFAULTS: dict[int, dict[str, Any]] = {
    # Stage 1 pretrains the UNet from scratch on short captions: 1200 steps at 3e-3 (~10 min on one CPU rank)
    1: {"model.lora.enabled": False, "train.steps": 1200, "train.lr": 3e-3, "eval.every": 400,
        "data.synthetic_captions": "short"},
    2: {"model.lora.enabled": True, "train.steps": 150, "data.synthetic_seed": 1, "data.synthetic_samples": 1000},
    3: {"model.lora.enabled": True, "train.steps": 80, "train.lr": 5e-5, "train.warmup_steps": 5,
        "data.synthetic_seed": 2, "data.synthetic_samples": 200},
}
