"""The data path, in order: JSONL samples -> token cache -> rows (packed or not) -> batches;
tokenizers and the `prepare`/`tokenizer` commands."""
