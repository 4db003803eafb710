"""The OpenAI-compatible HTTP server (`treeflash serve`): app (HTTP layer), scheduler (the engine thread that
batches generations), metrics (Prometheus)."""
