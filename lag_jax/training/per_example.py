"""The training-time adapter hook: n LoRA adapters in one batch, one per example.

Every example of a batch carries the slot id of the adapter it trains; each adapted
module adds ``scale * B_id A_id dropout(x)`` to its output, per example, exactly as
PEFT's LoRA layer does (``lora_B(lora_A(dropout(x))) * scaling``). The raw factors
A and B are the trainable parameters (the scale is not folded in), so that a
finished slot is a PEFT adapter as it stands.

Independence of slots is structural: an example only reads its own slot's factors,
its dropout mask comes from its own key, and the gradient of a slot's factors is a
sum over that slot's examples only (the backward of the gather is a scatter-add
whose other rows land in other slots).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from lag_jax.model.transformer import ADAPTABLE_MODULES

DELTA_MODES = ("gather", "onehot")


@struct.dataclass
class SlotLora:
  """Raw LoRA factors of n adapter slots, by module name.

  Attributes:
    a: module name -> [L, n, R, I] lora_A of every layer and slot.
    b: module name -> [L, n, O, R] lora_B (the LoRA scale is NOT folded in).
  """

  a: dict[str, jax.Array]
  b: dict[str, jax.Array]

  @property
  def n_slots(self) -> int:
    return next(iter(self.a.values())).shape[1]

  @property
  def modules(self) -> tuple[str, ...]:
    return tuple(self.a)


def module_index(name: str) -> int:
  """A fixed small integer per module name, folded into random keys."""
  return ADAPTABLE_MODULES.index(name)


def init_slot_lora(
  keys: jax.Array, shapes: dict[str, tuple[int, int]], num_layers: int, rank: int, dtype=jnp.float32
) -> SlotLora:
  """PEFT's initialisation for n slots: A ~ kaiming_uniform(a=sqrt(5)), B = 0.

  PEFT calls ``nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))``: the bound
  is gain * sqrt(3 / fan_in) with gain sqrt(2 / (1 + 5)), i.e. 1 / sqrt(I).

  Args:
    keys: [n, 2] uint32 raw threefry keys, one per slot (each adapter's own key, so
      its initial A does not depend on the slot it lands in).
    shapes: module name -> (O, I) of the modules to adapt.
    num_layers: L.
    rank: R.
  Returns:
    SlotLora with a [L, n, R, I] uniform in +-1/sqrt(I) and b [L, n, O, R] zeros.
  """
  keys = jax.random.wrap_key_data(jnp.asarray(keys, jnp.uint32))
  n = keys.shape[0]
  a, b = {}, {}
  for name, (O, I) in shapes.items():
    bound = 1.0 / math.sqrt(I)

    def draw(key, name=name, I=I, bound=bound):
      key = jax.random.fold_in(key, module_index(name))
      return jax.random.uniform(key, (num_layers, rank, I), jnp.float32, -bound, bound)

    a[name] = jnp.swapaxes(jax.vmap(draw)(keys), 0, 1).astype(dtype)  # [L, n, R, I]
    b[name] = jnp.zeros((num_layers, n, O, rank), dtype)
  return SlotLora(a=a, b=b)


@jax.tree_util.register_pytree_node_class
class PerExampleLora:
  """AdapterHook: example b adds slot ``ids[b]``'s LoRA delta, with LoRA dropout.

  Attributes:
    factors: the SlotLora being trained (leaves [L, n, ...]).
    ids: [B] int32, each example's slot.
    rng: [B, 2] uint32 raw threefry keys, one per example, or None (no dropout:
      evaluation). Per-example keys keep an example's mask independent of the rows
      around it.
    scale: the LoRA scale alpha / R (static).
    dropout: LoRA dropout probability on the adapter's input (static).
    mode: 'gather' (take each example's factors; backward is a scatter-add) or
      'onehot' (an einsum with a one-hot [B, n] matrix, the pattern vLLM's TPU
      backend uses; its cost grows with n).
  """

  def __init__(
    self,
    factors: SlotLora,
    ids: jax.Array,
    *,
    scale: float,
    dropout: float = 0.0,
    rng: jax.Array | None = None,
    mode: str = "gather",
  ):
    if mode not in DELTA_MODES:
      raise ValueError(f"mode must be one of {DELTA_MODES}, got {mode!r}")
    self.factors, self.ids, self.rng = factors, ids, rng
    self.scale, self.dropout, self.mode = float(scale), float(dropout), mode

  def tree_flatten(self):
    return (self.factors, self.ids, self.rng), (self.scale, self.dropout, self.mode)

  @classmethod
  def tree_unflatten(cls, aux, children):
    factors, ids, rng = children
    scale, dropout, mode = aux
    return cls(factors, ids, scale=scale, dropout=dropout, rng=rng, mode=mode)

  def per_layer(self):
    keys = None
    if self.rng is not None and self.dropout > 0.0:
      L = next(iter(self.factors.a.values())).shape[0]
      ex = jax.random.wrap_key_data(self.rng)  # [B]
      # [L, B] keys: a fresh mask per layer (and, in delta, per module).
      per = jax.vmap(lambda layer: jax.vmap(lambda k: jax.random.fold_in(k, layer))(ex))(
        jnp.arange(L)
      )
      keys = jax.random.key_data(per)  # [L, B, 2]
    return self.factors.a, self.factors.b, keys

  def delta(self, layer_xs, name, x):
    """x [B, T, I] -> (delta [B, T, O] or None, None)."""
    a_all, b_all, keys = layer_xs
    if name not in a_all:
      return None, None
    a, b = a_all[name], b_all[name]  # [n, R, I], [n, O, R]
    if keys is not None:
      p = self.dropout
      mkeys = jax.vmap(lambda k: jax.random.fold_in(k, module_index(name)))(
        jax.random.wrap_key_data(keys)
      )
      keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - p, x.shape[1:]))(mkeys)
      x = jnp.where(keep, x / jnp.asarray(1.0 - p, x.dtype), jnp.zeros((), x.dtype))
    if self.mode == "gather":
      a_sel = jnp.take(a, self.ids, axis=0)  # [B, R, I]
      b_sel = jnp.take(b, self.ids, axis=0)  # [B, O, R]
    else:
      onehot = jax.nn.one_hot(self.ids, a.shape[0], dtype=a.dtype)  # [B, n]
      a_sel = jnp.einsum("bn,nri->bri", onehot, a)
      b_sel = jnp.einsum("bn,nor->bor", onehot, b)
    r = jnp.einsum("bti,bri->btr", x, a_sel.astype(x.dtype))
    d = jnp.einsum("btr,bor->bto", r, b_sel.astype(x.dtype))
    return d * jnp.asarray(self.scale, d.dtype), None
