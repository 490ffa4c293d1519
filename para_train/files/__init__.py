"""The bottom layer: every file a run reads or writes, and the arithmetic of its sharded tensors.

    layout         where each file of a run lives (RunLayout / StageLayout / FinalLayout) and what a folder is
    complete       the COMPLETE protocol: flushed, listed, marked last; damaged checkpoints found and skipped
    zero3          ZeRO-3's partition arithmetic (ceil(numel / ranks) elements per rank, the last one padded)
    names          parameter names: the model's parts, LoRA tensors and peft's saved adapter names
    safetensors_io reading named tensors lazily from (sharded) safetensors folders
    model_weights  whole tensors into and out of a (ZeRO-3 sharded) model; a stage's final weights

Training, data precompute and export import these; nothing here imports them back.
"""
