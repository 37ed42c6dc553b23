"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3) in Flax NNX.

Module and parameter names copy HF (``model.layers.self_attn.q_proj.weight``), with
the layers stacked on a leading L axis so that the forward pass is one
``lax.scan``: compile time stays flat in depth.

The scan reads each layer's weights as a dynamic slice of the stack. TPU and GPU
dots read such a slice in place; XLA:CPU copies it into a buffer first, so a
memory-bound decode step reads and writes every weight once more than it needs
to. ``unstack_layers`` gives the layers' parameters as L separate arrays and
``__call__(..., layer_params=...)`` then runs them in an unrolled loop whose dots
read their own arrays (compile time grows with depth: a CPU decode option).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lag_jax.model import kv_cache as kvc
from lag_jax.model.config import ModelConfig
from lag_jax.model.layers import (
  AdapterHook,
  Dtype,
  Embedding,
  LayerAdapters,
  Linear,
  LoraWeights,
  RMSNorm,
  StaticLora,
)
from lag_jax.model.rope import apply_rope, inverse_frequencies

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ADAPTABLE_MODULES = ATTENTION_MODULES + MLP_MODULES


_NEG_INF = -1e30


class Attention(nnx.Module):
  def __init__(self, config: ModelConfig, *, stack, param_dtype, rngs):
    c = config
    D, H, K, E = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    kw = dict(stack=stack, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = Linear(D, H * E, name="q_proj", use_bias=c.attention_bias, **kw)
    self.k_proj = Linear(D, K * E, name="k_proj", use_bias=c.attention_bias, **kw)
    self.v_proj = Linear(D, K * E, name="v_proj", use_bias=c.attention_bias, **kw)
    self.o_proj = Linear(H * E, D, name="o_proj", use_bias=c.o_proj_bias, **kw)
    if c.qk_norm:
      self.q_norm = RMSNorm(E, c.rms_norm_eps, stack=stack, param_dtype=param_dtype)
      self.k_norm = RMSNorm(E, c.rms_norm_eps, stack=stack, param_dtype=param_dtype)
    else:
      self.q_norm = self.k_norm = None
    self.config = config

  def __call__(
    self,
    x,
    positions,
    key_positions,
    key_valid,
    cache_k,
    cache_v,
    adapters: LayerAdapters | None,
    layer: jax.Array | None = None,
  ):
    """One layer's attention.

    Args:
      x: [B, T, D] normalised hidden states.
      positions: [B, T] positions of the queries.
      key_positions: [B, S] positions of the keys (S = T without a cache).
      key_valid: [B, S] bool, False for padding keys.
      cache_k, cache_v: [L, B, K, S, E] the whole cache stack, this layer's own
        [B, K, S, E] cache (the unrolled loop over an unstacked cache), or None.
      adapters: this layer's adapter hook, or None.
      layer: [] int32 index of this layer in the cache stack.
    Returns:
      [B, T, D] output, and the updated (cache_k, cache_v), or None without a cache.
    """
    c = self.config
    B, T, _ = x.shape
    H, K, E = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    q = self.q_proj(x, adapters).reshape(B, T, H, E)
    k = self.k_proj(x, adapters).reshape(B, T, K, E)
    v = self.v_proj(x, adapters).reshape(B, T, K, E)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    inv_freq = inverse_frequencies(c)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    if cache_k is not None and cache_k.ndim == 4:
      cache_k = k = kvc.write_layer(cache_k, k, positions)  # k [B, K, S, E]
      cache_v = v = kvc.write_layer(cache_v, v, positions)
      new_cache = (cache_k, cache_v)
    elif cache_k is not None:
      cache_k = kvc.write(cache_k, layer, k, positions)
      cache_v = kvc.write(cache_v, layer, v, positions)
      k = jax.lax.dynamic_index_in_dim(cache_k, layer, keepdims=False)  # [B, K, S, E]
      v = jax.lax.dynamic_index_in_dim(cache_v, layer, keepdims=False)
      new_cache = (cache_k, cache_v)
    else:
      k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, T, E]
      new_cache = None

    q = q.reshape(B, T, K, c.q_per_kv, E)
    scores = jnp.einsum(
      "btkge,bkse->bkgts", q, k.astype(q.dtype), preferred_element_type=jnp.float32
    ) * (E**-0.5)
    qp, kp = positions[:, :, None], key_positions[:, None, :]
    mask = (kp <= qp) & key_valid[:, None, :]  # [B, T, S]
    if c.sliding_window is not None:
      mask &= kp > qp - c.sliding_window
    scores = jnp.where(mask[:, None, None], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    # Contract to [B, K, G, T, E], then transpose the small result: asking the dot
    # for T-major output sends XLA:CPU to a batched-dot path ~4x slower at B=16.
    out = jnp.einsum("bkgts,bkse->bkgte", probs, v).transpose(0, 3, 1, 2, 4)
    return self.o_proj(out.reshape(B, T, H * E), adapters), new_cache


class MLP(nnx.Module):
  def __init__(self, config: ModelConfig, *, stack, param_dtype, rngs):
    D, F = config.hidden_size, config.intermediate_size
    kw = dict(use_bias=config.mlp_bias, stack=stack, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = Linear(D, F, name="gate_proj", **kw)
    self.up_proj = Linear(D, F, name="up_proj", **kw)
    self.down_proj = Linear(F, D, name="down_proj", **kw)

  def __call__(self, x, adapters: LayerAdapters | None):
    """x [B, T, D] -> [B, T, D]."""
    h = jax.nn.silu(self.gate_proj(x, adapters)) * self.up_proj(x, adapters)
    return self.down_proj(h, adapters)


class DecoderLayer(nnx.Module):
  """Pre-norm attention + SwiGLU MLP. Built with ``stack=(L,)`` it holds all layers."""

  def __init__(self, config: ModelConfig, *, stack=(), param_dtype=jnp.float32, rngs):
    kw = dict(stack=stack, param_dtype=param_dtype, rngs=rngs)
    self.self_attn = Attention(config, **kw)
    self.mlp = MLP(config, **kw)
    eps = config.rms_norm_eps
    self.input_layernorm = RMSNorm(config.hidden_size, eps, stack=stack, param_dtype=param_dtype)
    self.post_attention_layernorm = RMSNorm(
      config.hidden_size, eps, stack=stack, param_dtype=param_dtype
    )

  def __call__(
    self, x, positions, key_positions, key_valid, cache_k, cache_v, adapters, layer=None
  ):
    h, cache = self.self_attn(
      self.input_layernorm(x),
      positions,
      key_positions,
      key_valid,
      cache_k,
      cache_v,
      adapters,
      layer,
    )
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x), adapters)
    return x, cache


class Decoder(nnx.Module):
  """HF's ``model``: embeddings, the stacked layers, the final norm."""

  def __init__(self, config: ModelConfig, *, param_dtype=jnp.float32, rngs):
    self.embed_tokens = Embedding(
      config.vocab_size, config.hidden_size, param_dtype=param_dtype, rngs=rngs
    )
    self.layers = DecoderLayer(
      config, stack=(config.num_hidden_layers,), param_dtype=param_dtype, rngs=rngs
    )
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)


class CausalLM(nnx.Module):
  """A Llama-family causal LM. Parameter paths match HF's checkpoint keys.

  Attributes:
    config: the architecture.
    dtype: compute dtype of activations (parameters keep their own dtype).
  """

  def __init__(
    self,
    config: ModelConfig,
    *,
    param_dtype: Dtype = jnp.float32,
    dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.config = config
    self.dtype = dtype
    self.model = Decoder(config, param_dtype=param_dtype, rngs=rngs)
    self.lm_head = (
      None
      if config.tie_word_embeddings
      else Linear(config.hidden_size, config.vocab_size, param_dtype=param_dtype, rngs=rngs)
    )

  def __call__(
    self,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    cache: kvc.KVCache | None = None,
    lora: dict[str, LoraWeights] | AdapterHook | None = None,
    *,
    attention_mask: jax.Array | None = None,
    return_hidden: bool = False,
    return_aux: bool = False,
    layer_params: tuple | None = None,
  ):
    """Runs the decoder.

    Args:
      tokens: [B, T] int token ids.
      positions: [B, T] int positions; default arange(T). With a cache, each row
        must be contiguous (it is written at slots positions[b, 0] ..).
      cache: a KVCache of length S to read and update, or None (no cache).
      lora: the adapters: a dict module name -> LoraWeights with leaves
        [L, R, I] / [L, O, R] (the same adapters for every token; modules absent
        from the dict are not adapted), or any AdapterHook (e.g. a routed library).
      attention_mask: [B, T] bool, False marks padding keys (no-cache only).
      return_hidden: return final normalised hidden states [B, T, D], not logits.
      return_aux: also return the hook's per-layer telemetry (module name ->
        pytree with a leading L axis), e.g. the adapter each token routed to.
      layer_params: the layers' parameters as L per-layer states
        (``unstack_layers(model)``): the layers run in an unrolled loop over them
        instead of the scan over the stack (the stacked ones are then not read).
        The cache may then be ``cache.unstacked()`` too (and is returned so).
    Returns:
      (logits [B, T, V] float32 or hidden [B, T, D], updated cache or None), plus
      the telemetry dict as a third element with ``return_aux``.
    """
    B, T = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if cache is None:
      key_positions = positions
      key_valid = jnp.ones((B, T), bool) if attention_mask is None else attention_mask.astype(bool)
    else:
      if attention_mask is not None:
        raise ValueError(
          "attention_mask is only for the cache-free forward pass; with a "
          "cache, padding is handled by positions"
        )
      key_positions = jnp.broadcast_to(jnp.arange(cache.length, dtype=jnp.int32), (B, cache.length))
      key_valid = jnp.ones((B, cache.length), bool)

    x = self.model.embed_tokens(tokens, self.dtype)
    graphdef, layer_state = nnx.split(self.model.layers)
    hook = StaticLora(lora) if isinstance(lora, dict) else lora
    hook_xs = None if hook is None else hook.per_layer()

    def run_layer(carry, state, hook_layer_xs, i):
      x, ck, cv = carry
      layer = nnx.merge(graphdef, state)
      adapters = None if hook is None else LayerAdapters(hook, hook_layer_xs)
      x, kv = layer(x, positions, key_positions, key_valid, ck, cv, adapters, i)
      aux = {} if adapters is None else adapters.aux
      return (x, *(kv or (None, None))), aux

    # The cache stack is carried through the layers (not scanned over as xs/ys), so
    # each layer writes its new keys in place instead of copying its slice out and
    # back every step: at batch 16 those copies cost more than the attention.
    carry = (x, None, None) if cache is None else (x, cache.k, cache.v)
    if layer_params is None:
      xs = (layer_state, hook_xs, jnp.arange(self.config.num_hidden_layers, dtype=jnp.int32))
      carry, aux = jax.lax.scan(lambda c, layer_xs: run_layer(c, *layer_xs), carry, xs)
    else:
      if len(layer_params) != self.config.num_hidden_layers:
        raise ValueError(
          f"layer_params has {len(layer_params)} layers; the model has "
          f"{self.config.num_hidden_layers}"
        )
      # A tuple cache (KVCache.unstacked) gives each layer its own arrays.
      per_layer_cache = cache is not None and isinstance(cache.k, tuple)
      auxes, ks, vs = [], [], []
      for i, state in enumerate(layer_params):
        layer_xs = None if hook_xs is None else jax.tree.map(lambda a, i=i: a[i], hook_xs)
        if per_layer_cache:
          carry = (carry[0], cache.k[i], cache.v[i])
        carry, layer_aux = run_layer(carry, state, layer_xs, jnp.int32(i))
        auxes.append(layer_aux)
        ks.append(carry[1])
        vs.append(carry[2])
      aux = jax.tree.map(lambda *a: jnp.stack(a), *auxes)
      if per_layer_cache:
        carry = (carry[0], tuple(ks), tuple(vs))
    x, ck, cv = carry
    h = self.model.norm(x)
    new_cache = None if cache is None else kvc.KVCache(k=ck, v=cv)
    out = h if return_hidden else self.logits(h)
    return (out, new_cache, aux) if return_aux else (out, new_cache)

  def logits(self, h: jax.Array) -> jax.Array:
    """h [B, T, D] -> [B, T, V] float32."""
    if self.lm_head is None:
      return self.model.embed_tokens.attend(h)
    return jnp.einsum(
      "btd,vd->btv", h, self.lm_head.weight[...].astype(h.dtype), preferred_element_type=jnp.float32
    )


def unstack_layers(model: CausalLM) -> tuple[nnx.State, ...]:
  """The decoder layers' parameters as L separate per-layer states (copies), for
  ``CausalLM.__call__(..., layer_params=...)``. Shardings of the non-layer axes
  are kept."""
  _, state = nnx.split(model.model.layers)
  L = model.config.num_hidden_layers
  return _unstack(state, L)


@functools.partial(jax.jit, static_argnums=1)
def _unstack(state, num_layers: int):
  return tuple(jax.tree.map(lambda a, i=i: a[i], state) for i in range(num_layers))
