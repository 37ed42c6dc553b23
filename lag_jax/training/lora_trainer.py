"""Trains n LoRA adapters at once with one compiled step (optax AdamW).

A batch holds B = n * b examples; each example names the slot (adapter) it trains.
One jitted step computes every slot's loss, gradient and AdamW update; nothing in
it loops over adapters in Python and nothing recompiles when adapters come and go
(the shapes are fixed: n slots, B rows, T tokens).

Slots are trained independently, so that a slot's result is the same whichever
adapters share its batches:
  - the loss is the sum over slots of each slot's own token-mean loss, so a slot's
    gradient is its own mean-loss gradient (a batch-wide mean would scale it by
    the other slots' token counts);
  - the optimizer is vmapped over the slot axis: per-slot gradient clipping, Adam
    moments, step count (bias correction) and learning-rate schedule (each slot's
    own warm-up and cosine over its own number of steps);
  - a slot with no loss token in a batch is left exactly as it was (parameters and
    optimizer state are selected per slot): AdamW would otherwise move it by
    momentum and weight decay on a zero gradient.
A slot is (re)started by ``SlotTrainer.load``: PEFT init for its factors from its own
key, zero moments, step 0.

Base weights are arguments of the jitted step (never closed-over constants, which
XLA would constant-fold for minutes) and are not differentiated.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from lag_jax.adapters.peft_io import lora_scale
from lag_jax.model.transformer import ADAPTABLE_MODULES, MLP_MODULES, CausalLM
from lag_jax.training.per_example import (
  DELTA_MODES,
  PerExampleLora,
  SlotLora,
  init_slot_lora,
)

SCHEDULES = ("cosine", "constant")
# Times each jitted function was traced (a trace is a compile): tests assert that
# a build compiles its step once whatever the number of adapters.
_TRACES: collections.Counter[str] = collections.Counter()


def trace_counts() -> dict[str, int]:
  """How many times each jitted training function has been traced so far."""
  return dict(_TRACES)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How adapters are trained. Defaults are the LAG paper's knowledge adapters.

  Attributes:
    rank: R.
    alpha: lora_alpha; the scale is alpha / R (alpha / sqrt(R) with rsLoRA).
    use_rslora: rank-stabilised scaling.
    target_modules: short module names to adapt (gate/up/down for knowledge,
      q/k/v/o for task adapters).
    epochs: passes over each adapter's data.
    token_budget: if set, each adapter trains on at most about this many target
      tokens (whole rows, in training order, so later epochs are cut first).
    learning_rate: peak learning rate.
    warmup_steps: linear warm-up steps (per adapter).
    schedule: 'cosine' (decay to 0 over the adapter's own steps) or 'constant'.
    weight_decay: AdamW's decoupled weight decay.
    max_grad_norm: clip each adapter's gradient to this global norm (None: off).
      HF's Trainer clips at 1.0 by default; so do we.
    b1, b2, eps: Adam's constants.
    batch_size: examples (rows) per adapter per step; a step has n_slots *
      batch_size rows.
    max_seq_len: T, tokens per row (shorter builds use less, see data.py).
    dropout: LoRA dropout on the adapter input during training.
    seed: with the adapter's name, determines its init, data order and dropout.
    n_slots: adapters trained at once.
    pack: concatenate an adapter's texts (each ended by EOS) into one stream and
      cut it into rows (no padding waste); prompt/answer pairs are never packed.
    add_eos: end every text and answer with the tokenizer's EOS token.
    delta_mode: 'gather' or 'onehot' (see PerExampleLora).
    library_flush_fraction: the packed library is rewritten when the adapters
      waiting to join it reach this fraction of its size (or at the end), which
      keeps the total bytes written linear in the library size.
    library_dtype: storage dtype of the packed library.
  """

  rank: int = 6
  alpha: float = 12.0
  use_rslora: bool = False
  target_modules: tuple[str, ...] = MLP_MODULES
  epochs: int = 4
  token_budget: int | None = None
  learning_rate: float = 1e-4
  warmup_steps: int = 0
  schedule: str = "cosine"
  weight_decay: float = 0.0
  max_grad_norm: float | None = 1.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  batch_size: int = 1
  max_seq_len: int = 128
  dropout: float = 0.05
  seed: int = 0
  n_slots: int = 8
  pack: bool = True
  add_eos: bool = True
  delta_mode: str = "gather"
  library_flush_fraction: float = 0.25
  library_dtype: str = "float32"

  def __post_init__(self):
    object.__setattr__(self, "target_modules", tuple(self.target_modules))
    bad = sorted(set(self.target_modules) - set(ADAPTABLE_MODULES))
    if bad or not self.target_modules:
      raise ValueError(
        f"target_modules={list(self.target_modules)}: choose a non-empty "
        f"subset of {list(ADAPTABLE_MODULES)}"
      )
    for field in ("rank", "epochs", "batch_size", "max_seq_len", "n_slots"):
      if getattr(self, field) < 1:
        raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
    if self.max_seq_len < 2:
      raise ValueError("max_seq_len must be >= 2 (a row needs a context and a target)")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
    if self.delta_mode not in DELTA_MODES:
      raise ValueError(f"delta_mode must be one of {DELTA_MODES}, got {self.delta_mode!r}")
    if self.token_budget is not None and self.token_budget < 1:
      raise ValueError(f"token_budget must be >= 1 or None, got {self.token_budget}")
    if self.warmup_steps < 0 or self.learning_rate <= 0:
      raise ValueError("warmup_steps must be >= 0 and learning_rate > 0")

  @property
  def scale(self) -> float:
    return lora_scale(self.rank, self.alpha, self.use_rslora)

  @property
  def rows_per_step(self) -> int:
    """B."""
    return self.n_slots * self.batch_size

  def result_fields(self) -> dict[str, Any]:
    """The fields that decide what an adapter learns (n_slots, delta_mode and the
    library settings only change how fast, or how the library is written)."""
    skip = {"n_slots", "delta_mode", "library_flush_fraction", "library_dtype"}
    d = dataclasses.asdict(self)
    d["target_modules"] = list(self.target_modules)
    return {k: v for k, v in d.items() if k not in skip}


@struct.dataclass
class SlotOptState:
  """Optimizer state of n slots.

  Attributes:
    inner: the optax state, vmapped over slots: leaves that mirror the factors
      carry the slot axis at 1 ([L, n, ...]), per-slot scalars (Adam's count) at 0.
    step: [n] int32 updates each slot has taken.
    total_steps: [n] int32 the slot's planned number of steps (for the schedule).
  """

  inner: Any
  step: jax.Array
  total_steps: jax.Array


def slot_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """One slot's optimizer, with learning rate 1: the step multiplies its updates by
  the slot's own scheduled rate (AdamW's update is -lr * (adam + wd * p), so this is
  exactly optax.adamw at that rate)."""
  parts = []
  if config.max_grad_norm is not None:
    parts.append(optax.clip_by_global_norm(config.max_grad_norm))
  parts.append(
    optax.adamw(1.0, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay)
  )
  return optax.chain(*parts)


def learning_rate(step: jax.Array, total_steps: jax.Array, config: TrainConfig) -> jax.Array:
  """The scheduled rate of update number ``step`` (0-based) of ``total_steps``.

  Warm-up is linear and reaches the peak at step warmup_steps - 1 (its first step
  is not wasted at rate 0); the cosine then decays towards 0 over the remaining
  steps, as HF's ``get_cosine_schedule_with_warmup``.
  """
  step = step.astype(jnp.float32)
  total = total_steps.astype(jnp.float32)
  peak, warm = config.learning_rate, float(config.warmup_steps)
  warmup = peak * (step + 1.0) / max(warm, 1.0)
  if config.schedule == "constant":
    after = jnp.full_like(step, peak)
  else:
    progress = jnp.clip((step - warm) / jnp.maximum(total - warm, 1.0), 0.0, 1.0)
    after = peak * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  return jnp.where(step < warm, warmup, after)


def _slot_axes(tree):
  """For a one-slot tree: where each leaf's slot axis sits once batched over slots
  (scalars such as Adam's count at 0, [L, ...] leaves at 1)."""
  return jax.tree.map(lambda x: 0 if jnp.ndim(x) == 0 else 1, tree)


def _batched_axes(tree):
  """The same for a batched tree: [n] per-slot scalars at 0, [L, n, ...] leaves at 1."""
  return jax.tree.map(lambda x: 0 if x.ndim == 1 else 1, tree)


def _one_slot(lora: SlotLora) -> SlotLora:
  return jax.tree.map(lambda x: x[:, 0], lora)


def _select(keep_new: jax.Array, new, old, axes):
  """Per slot, ``new`` where keep_new[slot] else ``old``; axes as _slot_axes."""

  def pick(n, o, axis):
    shape = [1] * n.ndim
    shape[axis] = keep_new.shape[0]
    return jnp.where(keep_new.reshape(shape), n, o)

  return jax.tree.map(pick, new, old, axes)


def _inner_axes(config: TrainConfig, lora: SlotLora):
  tx = slot_optimizer(config)
  return _slot_axes(jax.eval_shape(tx.init, _one_slot(lora)))


def init_opt_state(config: TrainConfig, lora: SlotLora) -> SlotOptState:
  """Fresh optimizer state for every slot (zero moments, step 0, 1 planned step)."""
  tx = slot_optimizer(config)
  inner = jax.vmap(
    tx.init, in_axes=(_slot_axes(_one_slot(lora)),), out_axes=_inner_axes(config, lora)
  )(jax.tree.map(jnp.asarray, lora))
  n = lora.n_slots
  return SlotOptState(
    inner=inner, step=jnp.zeros((n,), jnp.int32), total_steps=jnp.ones((n,), jnp.int32)
  )


def slot_losses(
  logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array, ids: jax.Array, n_slots: int
) -> tuple[jax.Array, jax.Array]:
  """Next-token cross entropy, averaged per slot over that slot's masked targets.

  Args:
    logits: [B, T, V] float32.
    tokens: [B, T] int.
    loss_mask: [B, T]; position t counts when loss_mask[b, t] (token t is then a
      target, predicted from tokens < t; position 0 never counts).
    ids: [B] slot of each example.
    n_slots: n.
  Returns:
    (loss [n] mean loss of each slot (0 where it has no target), count [n] targets).
  """
  nll = optax.losses.softmax_cross_entropy_with_integer_labels(
    logits[:, :-1].astype(jnp.float32), tokens[:, 1:]
  )  # [B, T-1]
  mask = loss_mask[:, 1:].astype(jnp.float32)
  # Per row first, then per slot: a slot's sum never mixes in other slots' rows.
  row_sum = jnp.sum(nll * mask, axis=1)
  row_count = jnp.sum(mask, axis=1)
  total = jax.ops.segment_sum(row_sum, ids, n_slots)
  count = jax.ops.segment_sum(row_count, ids, n_slots)
  return total / jnp.maximum(count, 1.0), count


@functools.cache
def make_train_step(config: TrainConfig):
  """The jitted step ``step(graphdef, base_params, lora, opt_state, batch, rng)``.

  Args (of the returned function):
    graphdef: the model's nnx GraphDef (static).
    base_params: the model's nnx.State (an argument, not differentiated).
    lora: SlotLora, donated.
    opt_state: SlotOptState, donated.
    batch: dict with tokens [B, T] int32, loss_mask [B, T] bool, ids [B] int32.
    rng: [B, 2] uint32 per-example dropout keys, or None (no dropout).
  Returns:
    (lora, opt_state, metrics) with metrics: loss [n] (each slot's mean loss before
    the update), tokens [n] targets, active [n] bool (updated), lr [n] the rate
    used, grad_norm [n] before clipping.

  Equal configs share one compiled function (the factory is cached).
  """
  tx = slot_optimizer(config)

  def step(graphdef, base_params, lora, opt_state, batch, rng):
    _TRACES["train_step"] += 1
    model = nnx.merge(graphdef, base_params)
    n = lora.n_slots
    ids = batch["ids"].astype(jnp.int32)

    def loss_fn(lora):
      hook = PerExampleLora(
        lora, ids, scale=config.scale, dropout=config.dropout, rng=rng, mode=config.delta_mode
      )
      logits, _ = model(batch["tokens"], lora=hook)
      loss, count = slot_losses(logits, batch["tokens"], batch["loss_mask"], ids, n)
      # d(sum)/d(loss_j) = 1: each slot gets exactly its own mean-loss gradient.
      return jnp.sum(loss), (loss, count)

    grads, (loss, count) = jax.grad(loss_fn, has_aux=True)(lora)
    active = count > 0
    lr = learning_rate(opt_state.step, opt_state.total_steps, config)
    param_axes = _batched_axes(lora)
    inner_axes = _batched_axes(opt_state.inner)

    def update(g, s, p, rate):
      u, s = tx.update(g, s, p)
      u = jax.tree.map(lambda x: rate * x, u)
      return optax.apply_updates(p, u), s, optax.global_norm(g)

    new_lora, new_inner, gnorm = jax.vmap(
      update, in_axes=(param_axes, inner_axes, param_axes, 0), out_axes=(param_axes, inner_axes, 0)
    )(grads, opt_state.inner, lora, lr)
    new_lora = _select(active, new_lora, lora, param_axes)
    new_inner = _select(active, new_inner, opt_state.inner, inner_axes)
    new_opt = opt_state.replace(inner=new_inner, step=opt_state.step + active.astype(jnp.int32))
    metrics = {"loss": loss, "tokens": count, "active": active, "lr": lr, "grad_norm": gnorm}
    return new_lora, new_opt, metrics

  return jax.jit(step, static_argnums=0, donate_argnums=(2, 3))


@functools.cache
def make_load_slots(config: TrainConfig, shapes: tuple[tuple[str, int, int], ...], num_layers: int):
  """The jitted ``load(lora, opt_state, reset [n] bool, keys [n, 2], total_steps [n])``:
  slots where ``reset`` restart from PEFT init (drawn from their keys) with fresh
  optimizer state; the others are returned unchanged."""
  shape_dict = {m: (o, i) for m, o, i in shapes}

  def load(lora, opt_state, reset, keys, total_steps):
    _TRACES["load_slots"] += 1
    fresh = init_slot_lora(keys, shape_dict, num_layers, config.rank, jnp.float32)
    fresh_opt = init_opt_state(config, fresh)
    axes = _batched_axes(lora)
    inner_axes = _batched_axes(opt_state.inner)
    lora = _select(reset, fresh, lora, axes)
    inner = _select(reset, fresh_opt.inner, opt_state.inner, inner_axes)
    return lora, SlotOptState(
      inner=inner,
      step=jnp.where(reset, 0, opt_state.step),
      total_steps=jnp.where(reset, jnp.asarray(total_steps, jnp.int32), opt_state.total_steps),
    )

  return jax.jit(load, donate_argnums=(0, 1))


@jax.jit
def example_keys(adapter_keys: jax.Array, steps: jax.Array, rows: jax.Array) -> jax.Array:
  """Per-example dropout keys [B, 2]: the adapter's key, folded with its own step
  number and the example's row within the adapter's batch (never the row's place
  in the shared batch)."""
  keys = jax.random.wrap_key_data(adapter_keys)
  keys = jax.vmap(jax.random.fold_in)(keys, steps)
  keys = jax.vmap(jax.random.fold_in)(keys, rows)
  return jax.random.key_data(keys)


def module_shapes(model_config, target_modules) -> tuple[tuple[str, int, int], ...]:
  """(name, O, I) of each target module, in the model's module order (hashable)."""
  shapes = model_config.module_shapes()
  return tuple((m, *shapes[m]) for m in ADAPTABLE_MODULES if m in target_modules)


def _replicated_like(params) -> jax.sharding.Sharding:
  """A sharding that replicates over the devices of ``params``' first leaf."""
  sharding = jax.tree.leaves(params)[0].sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  if len(sharding.device_set) == 1:
    return sharding
  devices = np.array(sorted(sharding.device_set, key=lambda d: d.id))
  return jax.sharding.NamedSharding(
    jax.sharding.Mesh(devices, ("devices",)), jax.sharding.PartitionSpec()
  )


class SlotTrainer:
  """n adapter slots on one base model: load adapters into slots, step, read out.

  Attributes:
    config: the TrainConfig.
    graphdef, base_params: the split base model (base_params are passed to every
      jitted call as an argument).
    lora: SlotLora [L, n, ...] being trained.
    opt_state: SlotOptState.
  """

  def __init__(self, model: CausalLM, config: TrainConfig):
    self.config = config
    self.model_config = model.config
    self.graphdef, self.base_params = nnx.split(model)
    self.shapes = module_shapes(model.config, config.target_modules)
    n = config.n_slots
    self._step = make_train_step(config)
    self._load = make_load_slots(config, self.shapes, model.config.num_hidden_layers)
    L, R = model.config.num_hidden_layers, config.rank

    def empty():
      lora = SlotLora(
        a={m: jnp.zeros((L, n, R, i), jnp.float32) for m, _, i in self.shapes},
        b={m: jnp.zeros((L, n, o, R), jnp.float32) for m, o, _ in self.shapes},
      )
      return lora, init_opt_state(config, lora)

    # Committed to the base model's devices (replicated over its mesh), as the step's
    # outputs will be: uncommitted first arguments would compile the step twice.
    self.lora, self.opt_state = jax.jit(empty, out_shardings=_replicated_like(self.base_params))()

  @property
  def n_slots(self) -> int:
    return self.config.n_slots

  def load(self, reset: np.ndarray, keys: np.ndarray, total_steps: np.ndarray) -> None:
    """Restarts the slots where ``reset`` [n] (keys [n, 2] uint32, total_steps [n])."""
    self.lora, self.opt_state = self._load(
      self.lora,
      self.opt_state,
      jnp.asarray(reset, bool),
      jnp.asarray(keys, jnp.uint32),
      jnp.asarray(total_steps, jnp.int32),
    )

  def step(self, batch: dict[str, np.ndarray], rng: np.ndarray | None) -> dict[str, np.ndarray]:
    """One update of every slot that has targets in ``batch``; returns host metrics."""
    self.lora, self.opt_state, metrics = self._step(
      self.graphdef, self.base_params, self.lora, self.opt_state, batch, rng
    )
    return jax.device_get(metrics)

  def factors(self, slot: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Slot's raw factors: module name -> (a [L, R, I], b [L, O, R]) float32."""
    return {
      m: (np.asarray(self.lora.a[m][:, slot]), np.asarray(self.lora.b[m][:, slot]))
      for m in self.lora.modules
    }


def peft_modules(
  factors: dict[str, tuple[np.ndarray, np.ndarray]],
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Slot factors -> LoraAdapter.from_arrays' {'model.layers.{i}.mlp.gate_proj': (a, b)}."""
  out = {}
  for m, (a, b) in factors.items():
    parent = "mlp" if m in MLP_MODULES else "self_attn"
    for i in range(a.shape[0]):
      out[f"model.layers.{i}.{parent}.{m}"] = (
        np.ascontiguousarray(a[i]),
        np.ascontiguousarray(b[i]),
      )
  return out


def token_losses(
  model: CausalLM, tokens: np.ndarray, loss_mask: np.ndarray, lora=None
) -> np.ndarray:
  """Mean next-token loss of each row [B] (loss_mask as in slot_losses), with a
  static adapter (``lora``: a dict from ``stack_lora``) or none."""
  graphdef, params = nnx.split(model)
  return np.asarray(
    _row_losses(graphdef, params, jnp.asarray(tokens), jnp.asarray(loss_mask), lora)
  )


@functools.partial(jax.jit, static_argnums=0)
def _row_losses(graphdef, params, tokens, loss_mask, lora):
  model = nnx.merge(graphdef, params)
  logits, _ = model(tokens, lora=lora)
  B = tokens.shape[0]
  loss, _ = slot_losses(logits, tokens, loss_mask, jnp.arange(B), B)
  return loss


def check_finite(metrics: dict[str, np.ndarray], names: list[str | None]) -> None:
  """Raises FloatingPointError naming the adapters whose loss went NaN or Inf."""
  bad = [
    n
    for n, loss, a in zip(names, metrics["loss"], metrics["active"], strict=True)
    if n is not None and a and not math.isfinite(float(loss))
  ]
  if bad:
    raise FloatingPointError(
      f"non-finite training loss for adapters {bad}; lower learning_rate or check their data"
    )
