"""Training: data (records, prompts, regeneration), feature caches, the training loop, distributed runs and
drafter surgery."""
