"""Checkpoint readers: HF safetensors folders and GGUF files."""
