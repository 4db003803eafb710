"""The OpenAI-compatible HTTP server (`treeflash serve`) and its batching scheduler."""
