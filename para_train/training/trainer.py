"""The training loop of one stage: data -> ParaDiffusion -> DeepSpeed step, with guards, EMA,
checkpoints, progress and tracking."""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import time
from pathlib import Path

import torch

from para_train.config import REPO_ROOT, Config, ConfigError, save_config
from para_train.data.loader import build_train_loader, clean_shared_memory, prepare_data
from para_train.inference.export import export_model
from para_train.data.synthetic import synthetic_sample
from para_train.sampling import grid, sample_latents, to_pil
from para_train.tracking import code_params, create_tracker
from para_train.training import checkpoint, engine as engine_mod, weights
from para_train.training.distributed import DistEnv, all_reduce_sum, barrier, wait_for_all
from para_train.training.ema import ShardedEMA
from para_train.training.memory import model_state_bytes
from para_train.training.validation import Validator, held_out_set

log = logging.getLogger(__name__)

# Exit code after a checkpoint forced by a signal: "saved, please requeue" (EX_TEMPFAIL).
REQUEUE_EXIT_CODE = 75


class NonFiniteError(RuntimeError):
    pass


class StopRequested(SystemExit):
    pass


class Trainer:
    def __init__(self, cfg: Config, dist_env: DistEnv):
        self.cfg, self.env = cfg, dist_env
        self.rank = dist_env.rank
        self.stage_dir = cfg.stage_dir
        self.ckpt_root = self.stage_dir / "checkpoints"
        self.device = torch.device(f"cuda:{dist_env.local_rank}" if dist_env.use_cuda else "cpu")
        self._stop_signal = False
        if self.rank == 0:
            self.stage_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.stage_dir / "config.yaml")
        barrier()

        ds_config = engine_mod.deepspeed_config(cfg, dist_env)
        self.precision = "bf16" if ds_config["bf16"]["enabled"] else "fp32"
        resume_path, resume_meta = self._find_resume()
        universal = None
        if resume_meta is not None and resume_meta["world_size"] != dist_env.world_size:
            universal = checkpoint.to_universal(resume_path, self.rank)
            ds_config["checkpoint"] = {"load_universal": True}
        prepare_data(cfg)  # e.g. generate the synthetic set once, before the model takes memory
        built = engine_mod.build_model(cfg, dist_env, ds_config)
        self.tokenizer, self.latent_encoder, self.num_params = built.tokenizer, built.latent_encoder, built.num_params
        self.engine, self.optimizer, self.scheduler = engine_mod.initialize(cfg, built, ds_config)
        self.model = self.engine.module
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.ema = (ShardedEMA(trainable, cfg.train.ema_decay, engine_mod.fp32_master_views(self.model, cfg))
                    if cfg.train.ema_decay > 0 else None)
        self.init_report = built.init_report
        # Noise, timesteps, VAE sampling and caption dropout draw from this generator only (seed, stage, rank).
        self.gen = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + cfg.run.stage * 1009 + self.rank)
        empty = self.tokenizer([""], max_length=cfg.model.llm.max_length, padding="max_length", truncation=True,
                               return_tensors="pt")
        self.empty_ids, self.empty_mask = empty["input_ids"][0], empty["attention_mask"][0]
        clean_shared_memory(cfg)
        self.loader = build_train_loader(cfg, self.tokenizer, cfg.data.resolution // self.latent_encoder.downsample)
        self._write_shard_report()
        self.validator = self._make_validator()
        self.step = 0
        self.skipped_steps = 0
        self.skipped_samples = self.samples_read = 0.0
        self.consecutive_skips = 0
        self.images_seen = 0
        self.run_id = None
        self._resume(resume_path, resume_meta, universal)
        # One MLflow store per training (run.dir); stages 2-3 nest under stage 1's run.
        first = Path(cfg.run.dir).expanduser() / "stage1" / "final" / "mlflow_run_id"
        parent = first.read_text().strip() if cfg.run.stage > 1 and first.is_file() else None
        code = code_params(REPO_ROOT) if self.rank == 0 and cfg.tracking.enabled else {}
        tags = {"stage": str(cfg.run.stage), "slurm_job_id": dist_env.slurm_job_id or ""}
        if "git" in code:
            tags["mlflow.source.git.commit"] = code["git"]["revision"]
        self.tracker = create_tracker(cfg.tracking, str(Path(cfg.run.dir).expanduser()), self.rank,
                                      env_tracking_uri=dist_env.mlflow_tracking_uri, resume_run_id=self.run_id,
                                      parent_run_id=parent, tags=tags)
        if self.step == 0:
            self.tracker.log_params({**cfg.to_dict(), **code, **self.init_report, "world_size": dist_env.world_size,
                                     "num_nodes": dist_env.num_nodes, **{f"params.{k}": v for k, v in self.num_params.items()}})

    # ------------------------------------------------------------------ set-up
    def _write_shard_report(self, model_state: dict | None = None) -> None:
        """What this rank holds under ZeRO-3: ranks/rank<r>.json in the stage dir, with each parameter's
        shard and, once a step has run, the bytes of parameters, gradients, optimizer state and EMA."""
        tensors = {n: [int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel(),
                       int(getattr(p, "ds_numel", p.numel()))] for n, p in self.model.named_parameters()}
        report = {"rank": self.rank, "world_size": self.env.world_size, "precision": self.precision,
                  "local_numel": sum(v[0] for v in tensors.values()), "total_numel": sum(v[1] for v in tensors.values()),
                  "model_state_bytes": model_state, "tensors": tensors}
        out = self.stage_dir / "ranks"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{self.rank}.json").write_text(json.dumps(report))
        if model_state is not None:
            if self.rank == 0:
                log.info("model state on this rank after one step: %.1f MiB (ranks/rank<r>.json)",
                         model_state["total"] / 2 ** 20)
        elif self.rank == 0:
            log.info("ZeRO-%d: this rank holds %.2fM of %.2fM parameter elements", self.cfg.deepspeed.zero_stage,
                     report["local_numel"] / 1e6, report["total_numel"] / 1e6)

    def _make_validator(self) -> Validator | None:
        cfg = self.cfg
        if cfg.eval.every == 0:
            return None
        held = held_out_set(cfg)
        if held is None:
            if self.rank == 0:
                log.warning("no validation: the data are not the synthetic default and eval.remote is not set; point "
                            "eval.remote at held-out MDS shards for val/loss, or set eval.every=0 to say so")
            return None
        return Validator(cfg, held, self.tokenizer, self.latent_encoder, self.device, self.rank, self.env.world_size)

    def _find_resume(self) -> tuple[Path | None, dict | None]:
        c = self.cfg.checkpoint
        if c.resume == "never":
            return None, None
        path = checkpoint.latest_checkpoint(self.ckpt_root) if c.resume == "auto" else Path(c.resume)
        if path is None:
            return None, None
        if not (path / checkpoint.COMPLETE).is_file():
            raise ConfigError(f"checkpoint.resume: {path} is not a complete checkpoint (no {checkpoint.COMPLETE} "
                              "marker); name a complete one or use checkpoint.resume=auto")
        problem = checkpoint.damage(path)
        if problem is not None:
            raise ConfigError(f"checkpoint.resume: {path} is damaged: {problem}; name another checkpoint or use "
                              "checkpoint.resume=auto (the newest undamaged one)")
        return path, checkpoint.read_meta(path)

    def _resume(self, path: Path | None, meta: dict | None, universal: Path | None) -> None:
        if path is None:
            return
        if universal is None:
            state = checkpoint.load(self.engine, path, self.rank)
            ema_state = state["ema"]
        else:  # saved by a different number of ranks: DeepSpeed's universal format, our state re-sharded
            state = checkpoint.load_resharded(self.engine, path, universal, self.rank, meta["world_size"])
            ema_state = None
            if self.ema is not None and state["ema_full"] is not None:
                ema_state = checkpoint.reshard_ema(state["ema_full"], self.ema)
            if state["generator"] is None:  # a rank that did not exist before: fresh, deterministic draws
                state["generator"] = torch.Generator().manual_seed(
                    self.cfg.run.seed * 1_000_003 + self.cfg.run.stage * 1009 + self.rank + 7919 * state["step"]).get_state()
        self.step, self.skipped_steps, self.images_seen = state["step"], state["skipped_steps"], state["images_seen"]
        self.run_id = state.get("run_id")
        self.skipped_samples, self.samples_read = state["skipped_samples"], state["samples_read"]
        if state["rng"] is not None:
            checkpoint.set_rng_state(state["rng"])
        self.gen.set_state(state["generator"])
        if self.ema is not None:
            self.ema.load_state_dict(ema_state)
        self.loader.load_state_dict(state["loader"])
        if self.rank == 0:
            self._truncate_metrics(self.step)
            log.info("resumed from %s at step %d", path, self.step)
            if universal is not None:
                old, new = meta["world_size"], self.env.world_size
                mb = self.cfg.train.micro_batch_size * self.cfg.train.grad_accum
                log.warning("resumed on %d ranks from a checkpoint of %d ranks (universal checkpoint %s): weights and "
                            "optimizer state are exact; the global batch changes from %d to %d samples per step and "
                            "ranks that did not exist before draw fresh noise; the data position (sample %d of the "
                            "epoch) is kept", new, old, universal, mb * old, mb * new, state["loader"].get(
                                "sample_in_epoch", -1))

    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines from steps after the checkpoint: they will be run again."""
        path = self.stage_dir / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(x + "\n" for x in kept))
            os.replace(tmp, path)

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = True  # acted on at the next step boundary, on every rank at once

    # ------------------------------------------------------------------ the loop
    def train(self) -> None:
        cfg = self.cfg
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        batches = self._batches()
        t_last, samples_since = time.perf_counter(), 0
        start_step = self.step
        t_start = time.perf_counter()
        if self.rank == 0:
            log.info("stage %d: %d steps, %d ranks, micro batch %d x accum %d; trainable %.2fM of %.2fM parameters",
                     cfg.run.stage, cfg.train.steps, self.env.world_size, cfg.train.micro_batch_size,
                     cfg.train.grad_accum, self.num_params["trainable"] / 1e6, self.num_params["total"] / 1e6)
        while self.step < cfg.train.steps:
            metrics, stop = self._train_step(batches)
            if self.step == start_step:  # Adam's state exists from the first step on
                self._write_shard_report(model_state_bytes(self.engine, self.model, self.ema))
            self.step += 1
            self.images_seen += cfg.train.micro_batch_size * cfg.train.grad_accum * self.env.world_size
            samples_since += cfg.train.micro_batch_size * cfg.train.grad_accum * self.env.world_size
            if self.rank == 0:
                now = time.perf_counter()
                metrics["samples_per_s"] = samples_since / (now - t_last)
                samples_since = 0
            if self.validator is not None and (self.step % cfg.eval.every == 0 or self.step == cfg.train.steps):
                metrics.update(self._validate())  # before the step's checkpoint: a resume never skips a validation
            if self.rank == 0:
                t_last = time.perf_counter()  # the next step's throughput leaves the validation out
                self._log(metrics, t_start, start_step)
            every = cfg.tracking.sample_every
            if every and self.step % every == 0 and self.step < cfg.train.steps:  # the last step samples in _finish
                self._log_samples()
            if self.step % cfg.checkpoint.every == 0 or self.step == cfg.train.steps or stop:
                self._save_checkpoint()
            if cfg.debug.crash_at_step == self.step and cfg.debug.crash_rank == self.rank:
                _crash_once(self.stage_dir, self.step)
            if stop:
                if self.rank == 0:
                    log.warning("stop requested by signal: checkpoint saved at step %d; exiting with %d so the job "
                                "is requeued", self.step, REQUEUE_EXIT_CODE)
                raise StopRequested(REQUEUE_EXIT_CODE)
        self._finish()

    def _batches(self):
        empty_epochs = 0  # a resume at the very end of an epoch legitimately yields nothing once
        while True:
            yielded = False
            for batch in self.loader:
                yielded = True
                yield batch
            empty_epochs = 0 if yielded else empty_epochs + 1
            if empty_epochs >= 2:
                raise RuntimeError(f"the data set yielded no batch of {self.cfg.train.micro_batch_size} "
                                   "per rank; use more samples or a smaller train.micro_batch_size")

    def _train_step(self, batches) -> tuple[dict, bool]:
        cfg, dbg = self.cfg, self.cfg.debug
        t0 = time.perf_counter()
        data_wait = 0.0
        losses, truncated, stop = [], 0.0, False
        micro = 0
        while micro < cfg.train.grad_accum:
            td = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - td
            loss = self._forward(batch)
            if dbg.nan_loss_at_step == self.step + 1 and dbg.nan_loss_rank == self.rank and self.skipped_steps == 0:
                loss = loss * float("nan")
            finite = bool(torch.isfinite(loss))
            bad = float(batch["skipped"].sum()) if "skipped" in batch else 0.0  # bad samples replaced in this batch
            # One all-reduce for every per-step flag. The tensor lives on this rank's device: NCCL serves only
            # CUDA tensors (gloo on the CPU), and .tolist() is then the step's one device-to-host sync.
            stats = torch.tensor([loss.item() if finite else 0.0, 0.0 if finite else 1.0, float(self._stop_signal),
                                  float(batch["truncated"].float().mean()), bad], dtype=torch.float64,
                                 device=self.device)
            loss_sum, nonfinite, stops, trunc_sum, bad_sum = all_reduce_sum(stats).tolist()
            self._check_skip_rate(bad_sum, len(batch["input_ids"]) * self.env.world_size)
            stop = stop or stops > 0
            if nonfinite > 0:  # a non-finite loss on any rank: every rank skips this update
                self.skipped_steps += 1
                self.consecutive_skips += 1
                if self.rank == 0:
                    log.warning("step %d: non-finite loss on %d rank(s); update skipped (%d in a row)",
                                self.step + 1, int(nonfinite), self.consecutive_skips)
                if self.consecutive_skips >= cfg.train.max_consecutive_skips:
                    raise NonFiniteError(f"{self.consecutive_skips} consecutive non-finite steps at step {self.step + 1}: "
                                         "lower train.lr, check the data, or resume from an earlier checkpoint")
                continue
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss_sum / self.env.world_size)
            truncated += trunc_sum / self.env.world_size
            micro += 1
        self.consecutive_skips = 0
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        if not math.isfinite(grad_norm):
            self.skipped_steps += 1  # DeepSpeed discarded this update (non-finite gradients)
        elif self.ema is not None:
            self.ema.update()
        metrics = {"loss": sum(losses) / len(losses), "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                   "skipped_steps": self.skipped_steps, "skipped_samples": self.skipped_samples, "data_wait_s": data_wait,
                   "compute_s": time.perf_counter() - t0 - data_wait, "truncation_rate": truncated / len(losses),
                   "images_seen": self.images_seen + cfg.train.micro_batch_size * cfg.train.grad_accum * self.env.world_size,
                   "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        return metrics, stop

    def _validate(self) -> dict[str, float]:
        t0 = time.perf_counter()
        val = self.validator.run(self.model)
        if self.rank == 0:
            faith = {k.rsplit("/", 1)[1]: v for k, v in val.items() if k.startswith("val/faithfulness/")}
            log.info("step %d validation (%.1f s): val/loss %.4f (%s)%s", self.step, time.perf_counter() - t0,
                     val["val/loss"], ", ".join(f"t={k.split('_t')[1]} {v:.4f}" for k, v in val.items()
                                               if k.startswith("val/loss_t")),
                     "; faithfulness " + ", ".join(f"{k} {v:.3f}" for k, v in faith.items()) if faith else "")
        return val

    def _check_skip_rate(self, bad: float, good: int) -> None:
        self.skipped_samples += bad
        self.samples_read += bad + good
        rate = self.skipped_samples / self.samples_read
        if self.samples_read >= 256 and rate > self.cfg.data.max_skip_rate:
            raise RuntimeError(f"{int(self.skipped_samples)} of {int(self.samples_read)} samples were bad ({rate:.1%}, above "
                               f"data.max_skip_rate={self.cfg.data.max_skip_rate}); fix the data set, or raise "
                               "data.max_skip_rate if that is expected")

    def _forward(self, batch: dict) -> torch.Tensor:
        p = self.cfg.data.caption_dropout
        ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
        b = ids.shape[0]
        drop = torch.rand(b, generator=self.gen) < p
        length = ids.shape[1]  # the batch's padded length (data.dataset.collate)
        ids[drop], mask[drop] = self.empty_ids[:length], self.empty_mask[:length]
        if "latents" in batch:  # precomputed by `para-train data precompute`
            latents = batch["latents"].float()
        else:
            latents = self.latent_encoder.encode(batch["pixels"].to(self.device), generator=self.gen
                                                 if self.device.type == "cpu" else None)
        noise = torch.randn(latents.shape, generator=self.gen)
        t = torch.randint(0, self.cfg.model.num_train_timesteps, (b,), generator=self.gen)
        d = self.device
        text = batch.get("text_embeds")  # precomputed frozen-LLM features (stage 1 only)
        if text is not None:
            text = text.to(d, self.model.unet.dtype)  # the dtype the live LLM would produce (bf16 on GPU)
            text[drop.to(d)] = self._empty_text_embeds()[:length].to(text.dtype)
        return self.engine(latents.to(d), ids.to(d), mask.to(d), noise.to(d), t.to(d), text)

    def _empty_text_embeds(self) -> torch.Tensor:
        """The empty caption through the frozen LLM, for caption dropout with precomputed embeddings."""
        if getattr(self, "_empty_embeds", None) is None:
            with torch.no_grad():
                self._empty_embeds = self.model.text_encoder(self.empty_ids[None].to(self.device),
                                                             self.empty_mask[None].to(self.device))[0]
        return self._empty_embeds

    # ------------------------------------------------------------------ outputs
    def _log(self, metrics: dict, t_start: float, start_step: int) -> None:
        cfg = self.cfg
        record = {"step": self.step, **metrics}
        with open(self.stage_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
            elapsed = time.perf_counter() - t_start
            rate = (self.step - start_step) / max(elapsed, 1e-9)
            eta = (cfg.train.steps - self.step) / max(rate, 1e-9)
            log.info("step %d/%d  loss %.4f  lr %.2e  grad %.3f  %.1f samples/s  ETA %s", self.step, cfg.train.steps,
                     metrics["loss"], metrics["lr"], metrics["grad_norm"], metrics["samples_per_s"],
                     time.strftime("%H:%M:%S", time.gmtime(eta)))
        if (self.step % cfg.tracking.log_every == 0 or self.step == cfg.train.steps
                or any(k.startswith("val/") for k in metrics)):  # no validation point is left out of MLflow
            self.tracker.log_metrics(metrics, self.step)

    def _save_checkpoint(self) -> None:
        dbg = self.cfg.debug
        state = {"step": self.step, "skipped_steps": self.skipped_steps, "images_seen": self.images_seen,
                 "skipped_samples": self.skipped_samples, "samples_read": self.samples_read,
                 "rng": checkpoint.rng_state(), "generator": self.gen.get_state(), "run_id": self.tracker.run_id,
                 "ema": self.ema.state_dict() if self.ema is not None else None,
                 "loader": self.loader.state_dict()}
        meta = {"world_size": self.env.world_size, "stage": self.cfg.run.stage}
        if dbg.kill_in_checkpoint_at_step == self.step:
            _kill_after_engine_save(self.engine, self.ckpt_root, self.step)
        checkpoint.save(self.engine, self.ckpt_root, self.step, self.rank, state, meta, self.cfg.checkpoint.keep)

    def _finish(self) -> None:
        cfg = self.cfg
        final = self.stage_dir / "final"
        ema_state = self.ema.full_tensors(self.rank) if self.ema is not None else None
        if self.rank == 0 and final.exists():
            import shutil
            shutil.rmtree(final)
        weights.save_final(self.model, final, self.rank, ema_state)
        self._log_samples()
        barrier()
        if self.rank == 0:
            if cfg.debug.slow_finish_s > 0:
                log.warning("debug.slow_finish_s: the export starts in %.0f s", cfg.debug.slow_finish_s)
                time.sleep(cfg.debug.slow_finish_s)
            if self.tracker.run_id:
                (final / "mlflow_run_id").write_text(self.tracker.run_id + "\n")
            self.tracker.log_artifact(str(self.stage_dir / "config.yaml"))
            export = export_model(final, self.stage_dir / "export", cfg)  # raw weights, the ones the samples show
            if cfg.tracking.registered_model_name:
                self.tracker.log_model(str(export), cfg.tracking.registered_model_name,
                                       tags={"stage": cfg.run.stage, "run_dir": cfg.run.dir})
            nxt = cfg.run.stage + 1
            log.info("stage %d done: diffusers export in %s, final weights in %s, checkpoints in %s, samples in %s, metrics in %s%s",
                     cfg.run.stage, self.stage_dir / "export", final, self.ckpt_root, self.stage_dir / "samples", self.stage_dir / "metrics.jsonl",
                     f"; next: deepspeed para_train/main.py --stage {nxt} run.dir={cfg.run.dir}" if nxt <= 3 else "")
            log.info("to go bigger: --config configs/stage%d_*.yaml (real-scale weights you supply), "
                     "or sbatch cluster/stage1_64nodes.sh", cfg.run.stage)
            self.tracker.close()  # the upload of the export to MLflow ends here (tracking.shutdown_timeout_s)
        # No rank leaves before rank 0's export and upload are done: under Slurm, the first task to exit starts
        # srun's --wait countdown, which would kill rank 0 in the middle of a long upload.
        wait_for_all()

    def _log_samples(self) -> None:
        """Sample the fixed paragraphs (every rank: ZeRO-3 gathers the weights) and log the grid from rank 0."""
        g = self._samples()
        if g is not None:
            self.tracker.log_image(g, f"samples/step_{self.step:08d}.png")

    def _samples(self):
        s, cfg = self.cfg.sample, self.cfg
        if s.num_images <= 0:
            return None
        d = cfg.data  # unseen scenes, captioned as this stage trains
        prompts = s.prompts or [synthetic_sample(10_000 + d.synthetic_seed, i, captions=d.synthetic_captions).caption
                                for i in range(s.num_images)]
        self.model.eval()
        unet = self.model.unet
        lat = cfg.data.resolution // self.latent_encoder.downsample
        latents = sample_latents(self.model.text_encoder, unet, self.tokenizer, prompts,
                                 max_length=cfg.model.llm.max_length,
                                 latent_shape=(unet.config.in_channels, lat, lat), seed=s.seed, steps=s.steps,
                                 guidance_scale=s.guidance_scale, prediction_type=cfg.model.prediction_type,
                                 num_train_timesteps=cfg.model.num_train_timesteps,
                                 zero_terminal_snr=cfg.model.zero_terminal_snr, device=self.device,
                                 dtype=unet.dtype,  # bf16 when DeepSpeed trains in bf16
                                 image_size=(cfg.data.resolution, cfg.data.resolution))
        self.model.train()
        if self.rank != 0:
            return None
        images = to_pil(self.latent_encoder.decode(latents))
        out = self.stage_dir / "samples"
        out.mkdir(exist_ok=True)
        for i, img in enumerate(images):
            img.save(out / f"step{self.step:08d}_{i}.png")
        g = grid(images)
        g.save(out / f"grid_step{self.step:08d}.png")
        (out / "prompts.json").write_text(json.dumps({"prompts": prompts, "seed": s.seed, "steps": s.steps,
                                                      "guidance_scale": s.guidance_scale}, indent=1))
        return g

    def close(self) -> None:
        tracker = getattr(self, "tracker", None)
        if tracker is not None:
            tracker.close()


def _kill_after_engine_save(engine, root: Path, step: int) -> None:
    """Fault injection (debug.kill_in_checkpoint_at_step): die after the shards are written, before COMPLETE."""
    engine.save_checkpoint(str(root), tag=checkpoint.tag_for(step), save_latest=False)
    os.kill(os.getpid(), signal.SIGKILL)


def _crash_once(stage_dir: Path, step: int) -> None:
    """Fault injection (debug.crash_at_step): die as a lost node does, the first time this step is reached."""
    marker = stage_dir / f"debug_crashed_at_step_{step}"
    if not marker.exists():
        marker.write_text(f"{os.getpid()}\n")
        log.warning("debug.crash_at_step: SIGKILL after step %d", step)
        os.kill(os.getpid(), signal.SIGKILL)
