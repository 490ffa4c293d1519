"""Data: shard writing, streaming, decoding and the synthetic paragraph scenes.

    sources.py      reading pairs: TSV (LaVi-Bridge), JSONL, captioned folders
    convert.py      pairs -> MDS shards, with a skip / caption-length report  (`para-train data convert`)
    precompute.py   shards -> shards with VAE latents / frozen-LLM text embeddings  (`para-train data precompute`)
    shards.py       the shard columns and writers; the synthetic set in the cache
    synthetic.py    the synthetic paragraph scenes
    transforms.py   image bytes -> pixels (resize, crop, flip)
    dataset.py      the streaming dataset: samples, bad-sample replacement, shard errors
    loader.py       config -> streams -> the training loader
"""
