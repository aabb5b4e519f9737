"""The `serve` command: an OpenAI-compatible API and a web chat over a batching engine."""
