"""Training LoRA adapters with optax: many adapters per compiled step, resumable builds."""

from __future__ import annotations

from lag_jax.training.build import build_library, text_losses
from lag_jax.training.data import AdapterJob, adapter_seeds, folder_name
from lag_jax.training.lora_trainer import (
  SlotOptState,
  SlotTrainer,
  TrainConfig,
  init_opt_state,
  learning_rate,
  make_train_step,
  slot_losses,
  trace_counts,
)
from lag_jax.training.per_example import PerExampleLora, SlotLora, init_slot_lora

__all__ = [
  "AdapterJob",
  "PerExampleLora",
  "SlotLora",
  "SlotOptState",
  "SlotTrainer",
  "TrainConfig",
  "adapter_seeds",
  "build_library",
  "folder_name",
  "init_opt_state",
  "init_slot_lora",
  "learning_rate",
  "make_train_step",
  "slot_losses",
  "text_losses",
  "trace_counts",
]
