"""The training loop of one stage: batches -> ParaDiffusion loss -> DeepSpeed step, with the guards (non-finite
losses, bad samples, signals), EMA, validation, progress, checkpoints and tracking of every step."""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import time

import torch

from para_train.training import checkpoint
from para_train.training.distributed import all_reduce_sum
from para_train.training.memory import model_state_bytes
from para_train.training.samples import log_samples
from para_train.training.stage import Stage, write_shard_report
from para_train.training.state import TrainState

log = logging.getLogger(__name__)

# Exit code after a checkpoint forced by a signal: "saved, please requeue" (EX_TEMPFAIL).
REQUEUE_EXIT_CODE = 75


class NonFiniteError(RuntimeError):
    pass


class StopRequested(SystemExit):
    pass


class Trainer:
    """Runs `stage` from `state` to cfg.train.steps (`train`); `train_step` and `forward` are its parts."""

    def __init__(self, stage: Stage, state: TrainState):
        self.stage, self.state = stage, state
        self.cfg, self.rank, self.world = stage.cfg, stage.rank, stage.env.world_size
        self.consecutive_skips = 0
        self._stop_signal = False
        empty = stage.tokenizer([""], max_length=self.cfg.model.llm.max_length, padding="max_length",
                                truncation=True, return_tensors="pt")
        self.empty_ids, self.empty_mask = empty["input_ids"][0], empty["attention_mask"][0]
        self._empty_embeds = None

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = True  # acted on at the next step boundary, on every rank at once

    def train(self) -> None:
        cfg, stage, st = self.cfg, self.stage, self.state
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        batches = self.batches()
        per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * self.world
        t_start = t_last = time.perf_counter()
        start_step, samples_since = st.step, 0
        if self.rank == 0:
            log.info("stage %d: %d steps, %d ranks, micro batch %d x accum %d; trainable %.2fM of %.2fM parameters",
                     cfg.run.stage, cfg.train.steps, self.world, cfg.train.micro_batch_size, cfg.train.grad_accum,
                     stage.num_params["trainable"] / 1e6, stage.num_params["total"] / 1e6)
        while st.step < cfg.train.steps:
            metrics, stop = self.train_step(batches)
            if st.step == start_step:  # Adam's state exists from the first step on
                write_shard_report(stage.run, stage.model, model_state_bytes(stage.engine, stage.model, stage.ema))
            st.step += 1
            st.images_seen += per_step
            samples_since += per_step
            if self.rank == 0:
                metrics["samples_per_s"] = samples_since / (time.perf_counter() - t_last)
                samples_since = 0
            if stage.validator is not None and (st.step % cfg.eval.every == 0 or st.step == cfg.train.steps):
                metrics.update(self._validate())  # before the step's checkpoint: a resume never skips a validation
            if self.rank == 0:
                t_last = time.perf_counter()  # the next step's throughput leaves the validation out
                self._log(metrics, t_start, start_step)
            every = cfg.tracking.sample_every
            if every and st.step % every == 0 and st.step < cfg.train.steps:  # the last step samples when finishing
                log_samples(stage, st.step)
            if st.step % cfg.checkpoint.every == 0 or st.step == cfg.train.steps or stop:
                self.save_checkpoint()
            if cfg.debug.crash_at_step == st.step and cfg.debug.crash_rank == self.rank:
                _crash_once(stage, st.step)
            if stop:
                if self.rank == 0:
                    log.warning("stop requested by signal: checkpoint saved at step %d; exiting with %d so the job "
                                "is requeued", st.step, REQUEUE_EXIT_CODE)
                raise StopRequested(REQUEUE_EXIT_CODE)

    def batches(self):
        """The loader's batches, epoch after epoch."""
        empty_epochs = 0  # a resume at the very end of an epoch legitimately yields nothing once
        while True:
            yielded = False
            for batch in self.stage.loader:
                yielded = True
                yield batch
            empty_epochs = 0 if yielded else empty_epochs + 1
            if empty_epochs >= 2:
                raise RuntimeError(f"the data set yielded no batch of {self.cfg.train.micro_batch_size} "
                                   "per rank; use more samples or a smaller train.micro_batch_size")

    def train_step(self, batches) -> tuple[dict, bool]:
        """One optimizer step (grad_accum micro-batches): its metrics, and whether a signal asked to stop."""
        cfg, dbg, st, engine = self.cfg, self.cfg.debug, self.state, self.stage.engine
        t0 = time.perf_counter()
        data_wait = 0.0
        losses, truncated, stop = [], 0.0, False
        micro = 0
        while micro < cfg.train.grad_accum:
            td = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - td
            loss = self.forward(batch)
            if dbg.nan_loss_at_step == st.step + 1 and dbg.nan_loss_rank == self.rank and st.skipped_steps == 0:
                loss = loss * float("nan")
            finite = bool(torch.isfinite(loss))
            bad = float(batch["skipped"].sum()) if "skipped" in batch else 0.0  # bad samples replaced in this batch
            # One all-reduce for every per-step flag. The tensor lives on this rank's device: NCCL serves only
            # CUDA tensors (gloo on the CPU), and .tolist() is then the step's one device-to-host sync.
            stats = torch.tensor([loss.item() if finite else 0.0, 0.0 if finite else 1.0, float(self._stop_signal),
                                  float(batch["truncated"].float().mean()), bad], dtype=torch.float64,
                                 device=self.stage.device)
            loss_sum, nonfinite, stops, trunc_sum, bad_sum = all_reduce_sum(stats).tolist()
            self._check_skip_rate(bad_sum, len(batch["input_ids"]) * self.world)
            stop = stop or stops > 0
            if nonfinite > 0:  # a non-finite loss on any rank: every rank skips this update
                st.skipped_steps += 1
                self.consecutive_skips += 1
                if self.rank == 0:
                    log.warning("step %d: non-finite loss on %d rank(s); update skipped (%d in a row)",
                                st.step + 1, int(nonfinite), self.consecutive_skips)
                if self.consecutive_skips >= cfg.train.max_consecutive_skips:
                    raise NonFiniteError(f"{self.consecutive_skips} consecutive non-finite steps at step {st.step + 1}: "
                                         "lower train.lr, check the data, or resume from an earlier checkpoint")
                continue
            engine.backward(loss)
            engine.step()
            losses.append(loss_sum / self.world)
            truncated += trunc_sum / self.world
            micro += 1
        self.consecutive_skips = 0
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        if not math.isfinite(grad_norm):
            st.skipped_steps += 1  # DeepSpeed discarded this update (non-finite gradients)
        elif self.stage.ema is not None:
            self.stage.ema.update()
        metrics = {"loss": sum(losses) / len(losses), "lr": self.stage.scheduler.get_last_lr()[0],
                   "grad_norm": grad_norm, "skipped_steps": st.skipped_steps, "skipped_samples": st.skipped_samples,
                   "data_wait_s": data_wait, "compute_s": time.perf_counter() - t0 - data_wait,
                   "truncation_rate": truncated / len(losses),
                   "images_seen": st.images_seen + cfg.train.micro_batch_size * cfg.train.grad_accum * self.world,
                   "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        return metrics, stop

    def forward(self, batch: dict) -> torch.Tensor:
        """The loss of one micro-batch: caption dropout, latents, noise and timesteps from the stage's generator."""
        stage, gen, d = self.stage, self.stage.gen, self.stage.device
        ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
        b = ids.shape[0]
        drop = torch.rand(b, generator=gen) < self.cfg.data.caption_dropout
        length = ids.shape[1]  # the batch's padded length (data.dataset.collate)
        ids[drop], mask[drop] = self.empty_ids[:length], self.empty_mask[:length]
        if "latents" in batch:  # precomputed by `para-train data precompute`
            latents = batch["latents"].float()
        else:
            latents = stage.latent_encoder.encode(batch["pixels"].to(d), generator=gen if d.type == "cpu" else None)
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, self.cfg.model.num_train_timesteps, (b,), generator=gen)
        text = batch.get("text_embeds")  # precomputed frozen-LLM features (stage 1 only)
        if text is not None:
            text = text.to(d, stage.model.unet.dtype)  # the dtype the live LLM would produce (bf16 on GPU)
            text[drop.to(d)] = self._empty_text_embeds()[:length].to(text.dtype)
        return stage.engine(latents.to(d), ids.to(d), mask.to(d), noise.to(d), t.to(d), text)

    def _empty_text_embeds(self) -> torch.Tensor:
        """The empty caption through the frozen LLM, for caption dropout with precomputed embeddings."""
        if self._empty_embeds is None:
            d = self.stage.device
            with torch.no_grad():
                self._empty_embeds = self.stage.model.text_encoder(self.empty_ids[None].to(d),
                                                                   self.empty_mask[None].to(d))[0]
        return self._empty_embeds

    def _check_skip_rate(self, bad: float, good: int) -> None:
        st, limit = self.state, self.cfg.data.max_skip_rate
        st.skipped_samples += bad
        st.samples_read += bad + good
        rate = st.skipped_samples / st.samples_read
        if st.samples_read >= 256 and rate > limit:
            raise RuntimeError(f"{int(st.skipped_samples)} of {int(st.samples_read)} samples were bad ({rate:.1%}, "
                               f"above data.max_skip_rate={limit}); fix the data set, or raise data.max_skip_rate if "
                               "that is expected")

    def _validate(self) -> dict[str, float]:
        t0 = time.perf_counter()
        val = self.stage.validator.run(self.stage.model)
        if self.rank == 0:
            faith = {k.rsplit("/", 1)[1]: v for k, v in val.items() if k.startswith("val/faithfulness/")}
            log.info("step %d validation (%.1f s): val/loss %.4f (%s)%s", self.state.step, time.perf_counter() - t0,
                     val["val/loss"], ", ".join(f"t={k.split('_t')[1]} {v:.4f}" for k, v in val.items()
                                               if k.startswith("val/loss_t")),
                     "; faithfulness " + ", ".join(f"{k} {v:.3f}" for k, v in faith.items()) if faith else "")
        return val

    def _log(self, metrics: dict, t_start: float, start_step: int) -> None:
        cfg, step = self.cfg, self.state.step
        with open(self.stage.layout.metrics, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            rate = (step - start_step) / max(time.perf_counter() - t_start, 1e-9)
            eta = (cfg.train.steps - step) / max(rate, 1e-9)
            log.info("step %d/%d  loss %.4f  lr %.2e  grad %.3f  %.1f samples/s  ETA %s", step, cfg.train.steps,
                     metrics["loss"], metrics["lr"], metrics["grad_norm"], metrics["samples_per_s"],
                     time.strftime("%H:%M:%S", time.gmtime(eta)))
        if (step % cfg.tracking.log_every == 0 or step == cfg.train.steps
                or any(k.startswith("val/") for k in metrics)):  # no validation point is left out of MLflow
            self.stage.tracker.log_metrics(metrics, step)

    def save_checkpoint(self) -> None:
        """Collective: the engine's shards and every rank's own state (TrainState, RNGs, EMA, data position)."""
        stage, st = self.stage, self.state
        st.run_id = stage.tracker.run_id
        own = {**st.counters(), "rng": checkpoint.rng_state(), "generator": stage.gen.get_state(),
               "ema": stage.ema.state_dict() if stage.ema is not None else None, "loader": stage.loader.state_dict()}
        meta = {"world_size": self.world, "stage": self.cfg.run.stage}
        if self.cfg.debug.kill_in_checkpoint_at_step == st.step:
            _kill_after_engine_save(stage, st.step)
        checkpoint.save(stage.engine, stage.layout.checkpoints, st.step, self.rank, own, meta, self.cfg.checkpoint.keep)


def _kill_after_engine_save(stage: Stage, step: int) -> None:
    """Fault injection (debug.kill_in_checkpoint_at_step): die after the shards are written, before COMPLETE."""
    path = stage.layout.checkpoint(step)
    stage.engine.save_checkpoint(str(path.parent), tag=path.name, save_latest=False)
    os.kill(os.getpid(), signal.SIGKILL)


def _crash_once(stage: Stage, step: int) -> None:
    """Fault injection (debug.crash_at_step): die as a lost node does, the first time this step is reached."""
    marker = stage.layout.crash_marker(step)
    if not marker.exists():
        marker.write_text(f"{os.getpid()}\n")
        log.warning("debug.crash_at_step: SIGKILL after step %d", step)
        os.kill(os.getpid(), signal.SIGKILL)
