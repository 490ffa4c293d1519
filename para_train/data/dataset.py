"""Streaming image-paragraph samples: decode, resize/crop, tokenize, skip bad samples.

Built on MosaicML streaming, whose sample order is a deterministic function of (seed, epoch,
world size) and whose position goes into the trainer's checkpoint, so a resumed rank sees exactly
the samples it would have seen.

A bad sample (an image that does not decode, an empty caption) is replaced by the next good one of
its stream (index + 1, + 2, ...): the replacement depends only on the data, so every rank and every
resumed run agree on it, and each rank still yields the same number of samples. The sample carries
`skipped` = how many bad ones it replaced; the trainer sums and reports them.

Broken shards and missing remotes are not bad samples: they raise `DataError` naming the shard
or path, from a loader worker as cleanly as from the main process.
"""
from __future__ import annotations

import functools
import logging
import os

import numpy as np
import torch
from streaming import Stream, StreamingDataLoader, StreamingDataset
from streaming.base.dataset import _ShardState  # private, but the only handle on a shard's download state
from torch.utils.data import default_collate

from para_train.config import ConfigError
from para_train.data.transforms import decode_image

log = logging.getLogger(__name__)

MAX_BAD_IN_A_ROW = 100  # more consecutive bad samples than this is a broken data set, not noise
_LOGGED_BAD = 20  # bad samples logged one by one per process; after that every 1000th


def tokenize(tokenizer, caption: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(input_ids, attention_mask, truncated): the caption's tokens cut at max_length, right-padded."""
    ids = tokenizer(caption)["input_ids"]
    truncated = len(ids) > max_length
    ids = ids[:max_length]
    input_ids = torch.full((max_length,), tokenizer.pad_token_id, dtype=torch.long)
    input_ids[: len(ids)] = torch.tensor(ids, dtype=torch.long)
    attention_mask = torch.zeros(max_length, dtype=torch.long)
    attention_mask[: len(ids)] = 1
    return input_ids, attention_mask, truncated


def bad_caption(caption) -> bool:
    return not isinstance(caption, str) or not caption.strip()


class DataError(RuntimeError):
    """A problem with the data (a corrupt shard, a missing remote, mismatched precomputed columns)."""

    def __init__(self, message: str):
        # Re-raised from a DataLoader worker, the message holds the worker's traceback: keep our message.
        marker = f"{type(self).__name__}: "
        if "Original Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


def _shard_location(stream: Stream, basename: str) -> str:
    return os.path.join(stream.remote or stream.local, stream.split, basename)


class ShardStream(Stream):
    """A Stream whose failures name the index or shard and say what to do."""

    def get_shards(self, world, allow_unsafe_types: bool):
        try:
            return super().get_shards(world, allow_unsafe_types)
        except Exception as e:
            where = _shard_location(self, "index.json")
            raise DataError(f"cannot read the shard index {where}: {e}. Check data.remote / data.streams (write shards "
                            "with `para-train data convert`) and, for object storage, the credentials and endpoint "
                            "(AWS_*, S3_ENDPOINT_URL)") from e

    def prepare_shard(self, shard) -> int:
        try:
            return super().prepare_shard(shard)
        except Exception as e:
            raw, _ = shard.file_pairs[0]
            where = _shard_location(self, raw.basename)
            text = str(e)
            if "Checksum failure" in text:
                for raw_info, zip_info in shard.file_pairs:  # never leave a corrupt copy in the cache
                    for info in (raw_info, zip_info):
                        if info is not None:
                            path = os.path.join(self.local, self.split, info.basename)
                            if os.path.exists(path):
                                os.remove(path)
                msg = (f"shard {where} failed its {self.validate_hash} check: it is corrupt or changed after it was "
                       "written. Re-run `para-train data convert` for this data set (or restore the shard)")
            elif "Hash algorithm" in text:
                msg = (f"shard {where} has no {self.validate_hash} hash in its index ({text}); set "
                       "data.validate_hash to a recorded one, or null to skip the check")
            else:
                msg = (f"shard {where} could not be downloaded after {self.download_retry} retries "
                       f"({type(e).__name__}: {text}). Check that it exists, the credentials, and "
                       "data.download_timeout")
            raise DataError(msg) from e


class ParagraphImageDataset(StreamingDataset):
    """MDS shards with `image` bytes and `caption` text (and optionally precomputed `latents` /
    `text_embeds`) -> training samples."""

    def __init__(self, *, tokenizer, max_length: int, resolution: int, crop: str = "center", flip: bool = False,
                 augment_seed: int = 0, use_latents: str = "never", use_text_embeds: str = "never",
                 llm_trains: bool = False, latent_side: int | None = None, **streaming_kwargs):
        super().__init__(**streaming_kwargs)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.resolution = resolution
        self.latent_side = latent_side  # precomputed latents must be this many latents wide (None: unchecked)
        self.crop, self.flip, self.augment_seed = crop, flip, augment_seed
        self.use_latents = self._choose_precomputed(use_latents, "latents", "use_latents")
        self.use_text_embeds = self._choose_precomputed(use_text_embeds, "text_embeds", "use_text_embeds")
        if self.use_latents and (flip or crop != "center"):
            raise ConfigError("data.flip / data.crop: precomputed latents are centre crops without flips; set "
                              "data.flip=false data.crop=center, or data.use_latents=never to decode images")
        if self.use_text_embeds and llm_trains:
            raise ConfigError("data.use_text_embeds: these shards hold precomputed text embeddings, but in this stage "
                              "LoRA trains the LLM, so its features change every step and stored ones would be stale; "
                              "set data.use_text_embeds=never (captions are tokenized as usual)")
        self._background_error: BaseException | None = None
        self._num_bad = 0

    def _choose_precomputed(self, mode: str, column: str, key: str) -> bool:
        """Whether to read a precomputed column: every stream must hold it, or none is used."""
        if mode == "never":
            return False
        have = [column in cols for cols in shard_columns(self)]
        if all(have):
            return True
        if mode == "always" or any(have):
            lacking = [s.remote or s.local for s, h in zip(self.streams, have) if not h]
            raise ConfigError(f"data.{key}={mode}: {', '.join(lacking)} hold(s) no `{column}` column; run "
                              f"`para-train data precompute` on every stream, or set data.{key}=never")
        return False

    # ---------------------------------------------------------------- streaming hooks
    def on_exception(self, future) -> None:
        """A download thread failed: remember why and stop the epoch (streaming would only log it)."""
        exc = future.exception()
        if exc is not None:
            self._background_error = exc
            self._event.set()
            # The thread died before noting its exit; at the epoch's end streaming waits for that note, and
            # with two dead threads it would wait forever.
            self._iterator.on_exit()

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        try:
            super().prepare_shard(shard_id, blocking)
        except BaseException:
            # Threads and other loader workers wait until the shard is LOCAL (streaming's state, shared by the
            # workers of a rank). Left PREPARING they would wait forever; as LOCAL they find its file missing,
            # download it themselves and fail with the same DataError. (The whole loader stops anyway.)
            self._shard_states[shard_id] = _ShardState.LOCAL
            raise

    def __iter__(self):
        yield from super().__iter__()
        self._raise_background_error()

    def _raise_background_error(self) -> None:
        exc = self._background_error
        if exc is not None:
            raise exc if isinstance(exc, DataError) else DataError(f"reading shards failed: {exc!r}")

    def _raw(self, idx: int, stream: Stream) -> dict:
        try:
            return self.get_item(idx)
        except DataError:
            raise
        except Exception as e:
            self._raise_background_error()
            shard_id, _ = self.spanner[idx]
            raise DataError(f"cannot read sample {idx} from shard {self.shards[shard_id].file_pairs[0][0].basename} "
                            f"of stream {stream.remote or stream.local}: {e}") from e

    # ---------------------------------------------------------------- samples
    def __getitem__(self, idx: int) -> dict:
        stream_id = int(np.searchsorted(self.sample_offset_per_stream, idx, side="right")) - 1
        stream = self.streams[stream_id]
        start, count = int(self.sample_offset_per_stream[stream_id]), int(self.samples_per_stream[stream_id])
        tries = min(MAX_BAD_IN_A_ROW, count)
        for skipped in range(tries):
            j = start + (idx - start + skipped) % count
            raw = self._raw(j, stream)
            sample = self._make_sample(raw, j)
            if isinstance(sample, dict):
                sample["skipped"] = skipped
                return sample
            self._note_bad(raw.get("sample_id"), j, sample)
        raise DataError(f"{tries} samples in a row from sample {idx} of stream {stream.remote or stream.local} are bad "
                        f"(e.g. {sample}); the shards are broken: convert the data again (`para-train data convert`)")

    def _note_bad(self, sample_id, idx: int, reason: str) -> None:
        self._num_bad += 1
        if self._num_bad <= _LOGGED_BAD or self._num_bad % 1000 == 0:
            log.warning("skipping bad sample %s (index %d): %s; %d bad so far in this process", sample_id, idx, reason,
                        self._num_bad)

    def _make_sample(self, raw: dict, idx: int) -> dict | str:
        """The training sample, or the reason it is bad."""
        caption = raw.get("caption")
        if bad_caption(caption):
            return "empty caption"
        input_ids, attention_mask, truncated = tokenize(self.tokenizer, caption, self.max_length)
        sample = {"input_ids": input_ids, "attention_mask": attention_mask, "truncated": truncated,
                  "sample_id": raw["sample_id"]}
        if self.use_latents:
            sample["latents"] = self._latents(raw)
        else:
            rng = np.random.default_rng([self.augment_seed, idx]) if (self.crop == "random" or self.flip) else None
            try:
                sample["pixels"] = decode_image(raw["image"], self.resolution, self.crop, self.flip, rng)
            except Exception as e:  # PIL raises many types for bad bytes
                return f"image does not decode ({type(e).__name__}: {e})"
        if self.use_text_embeds:
            sample["text_embeds"] = self._text_embeds(raw, int(attention_mask.sum()))
        return sample

    def _latents(self, raw: dict) -> torch.Tensor:
        latents = torch.from_numpy(np.asarray(raw["latents"], dtype=np.float32))
        side = self.latent_side
        if latents.ndim != 3 or (side is not None and tuple(latents.shape[-2:]) != (side, side)):
            raise DataError(f"sample {raw['sample_id']}: precomputed latents of shape {tuple(latents.shape)} do not "
                            f"fit data.resolution={self.resolution}; precompute again at this resolution or set "
                            "data.use_latents=never")
        return latents

    def _text_embeds(self, raw: dict, num_tokens: int) -> torch.Tensor:
        emb = np.asarray(raw["text_embeds"], dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != num_tokens:
            raise DataError(f"sample {raw['sample_id']}: precomputed text embeddings cover {emb.shape[0]} tokens but "
                            f"the tokenizer gives {num_tokens} at model.llm.max_length={self.max_length}; they were "
                            "computed with another tokenizer or max length: precompute again or set "
                            "data.use_text_embeds=never")
        out = torch.zeros(self.max_length, emb.shape[1], dtype=torch.float32)
        out[:num_tokens] = torch.from_numpy(emb)  # padding rows stay zero: the attention mask hides them
        return out


def shard_columns(dataset: StreamingDataset) -> list[set[str]]:
    """The column names of each stream (from its first shard)."""
    first = dataset.shard_offset_per_stream
    return [set(dataset.shards[int(first[i])].column_names) for i in range(dataset.num_streams)]


TEXT_PAD_MULTIPLE = 64  # batches pad their captions to the longest one, rounded up to this


def collate(samples: list[dict], max_length: int) -> dict:
    """Stack samples into a batch and cut the padding the whole batch shares: the text runs to the batch's longest
    caption rounded up to TEXT_PAD_MULTIPLE (a few shapes, so compiled kernels see few sizes), at most max_length.
    Right padding under a causal LLM and a masked cross-attention: the cut changes no real token's features."""
    batch = default_collate(samples)
    longest = max(1, int(batch["attention_mask"].sum(1).max()))
    keep = min(max_length, -(-longest // TEXT_PAD_MULTIPLE) * TEXT_PAD_MULTIPLE)
    for key in ("input_ids", "attention_mask", "text_embeds"):
        if key in batch:
            batch[key] = batch[key][:, :keep]
    return batch


def build_loader(*, streams: list[Stream], tokenizer, max_length: int, resolution: int, batch_size: int,
                 shuffle: bool, seed: int, num_workers: int, crop: str = "center", flip: bool = False,
                 use_latents: str = "never", use_text_embeds: str = "never", llm_trains: bool = False,
                 epoch_size: int | None = None, cache_limit: str | None = None,
                 num_canonical_nodes: int | None = None, latent_side: int | None = None) -> StreamingDataLoader:
    try:
        dataset = ParagraphImageDataset(
            tokenizer=tokenizer, max_length=max_length, resolution=resolution, crop=crop, flip=flip, augment_seed=seed,
            use_latents=use_latents, use_text_embeds=use_text_embeds, llm_trains=llm_trains, latent_side=latent_side, streams=streams,
            shuffle=shuffle, shuffle_seed=seed, batch_size=batch_size, epoch_size=epoch_size, cache_limit=cache_limit,
            num_canonical_nodes=num_canonical_nodes)
    except ValueError as e:
        if cache_limit and "cache" in str(e).lower() and not isinstance(e, ConfigError):
            raise ConfigError(f"data.cache_limit={cache_limit}: {e}") from None
        raise
    return StreamingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers, drop_last=True,
                               persistent_workers=False, collate_fn=functools.partial(collate, max_length=max_length))
