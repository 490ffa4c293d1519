"""Inference, export and evaluation: turning a training run into something people use.

    export.py        `para-train export`: final/ or a ZeRO-3 checkpoint -> a diffusers-loadable folder
    consolidate.py   reading trained weights (and the EMA) from final/ or a ZeRO-3 checkpoint, no pickles run
    text_encoder.py  the exported text encoder: LLM reference or copy, peft LoRA adapter, projection
    pipeline.py      ParaDiffusionPipeline, a diffusers DiffusionPipeline over the exported folder
    prompts.py       prompt files: text, JSONL, the ParaPrompts-400 CSV
    generate.py      `para-train generate`: prompt file -> PNGs, grid, generation.json
    faithfulness.py  scoring an image against a synthetic scene record (no torch)
    evaluate.py      `para-train evaluate`: faithfulness by paragraph length and description position

Heavy libraries (torch, diffusers, peft) are imported where they are used, so the CLI starts fast.
"""


class ExportError(ValueError):
    """A user-fixable problem with what is being exported (the message names the thing and the fix)."""


def __getattr__(name: str):
    if name == "ParaDiffusionPipeline":  # lazily: importing diffusers takes seconds
        from para_train.inference.pipeline import ParaDiffusionPipeline

        return ParaDiffusionPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
