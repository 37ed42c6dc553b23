"""PEFT LoRA adapters: read, write, create, and apply them to the model."""

from __future__ import annotations

from lag_jax.adapters.apply import merge_into_model, stack_lora, validate_adapter
from lag_jax.adapters.peft_io import (
  AdapterError,
  AdapterFile,
  LoraAdapter,
  ModuleLora,
  load_peft_adapter,
  save_peft_adapter,
)

__all__ = [
  "AdapterError",
  "AdapterFile",
  "LoraAdapter",
  "ModuleLora",
  "load_peft_adapter",
  "merge_into_model",
  "save_peft_adapter",
  "stack_lora",
  "validate_adapter",
]
