"""Token shards: preparation, tokenizers, and the per-rank loader."""
