"""Data: the embedded corpus and fact set, tokenizers, batching and per-host layout."""
