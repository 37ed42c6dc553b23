"""The Llama-family decoder: config, NNX modules, KV cache, sharding rules."""

from lag_jax.model.config import ModelConfig, UnsupportedConfigError
from lag_jax.model.kv_cache import KVCache
from lag_jax.model.layers import LoraWeights
from lag_jax.model.transformer import ADAPTABLE_MODULES, CausalLM

__all__ = [
  "ADAPTABLE_MODULES",
  "CausalLM",
  "KVCache",
  "LoraWeights",
  "ModelConfig",
  "UnsupportedConfigError",
]
