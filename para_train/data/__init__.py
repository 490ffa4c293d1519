"""Data: shard writing, streaming, decoding and the synthetic paragraph scenes."""
