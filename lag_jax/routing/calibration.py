"""Module-input statistics of the base model, for a calibrated arrow sketch.

A calibrated sketch (routing/arrow_sketch.py) keeps the arrow directions that matter
for the inputs a module actually sees. It needs, per layer and routed module, the
second moment C = E[x x^T] of the module's input over some calibration text: the base
model's own activations, nothing of the adapters or their data.

``input_moments`` runs the base model over token sequences and returns those moments;
``generic_prompts`` is the default calibration text: real questions (FanOutQA) and
Wikipedia sentences rendered in the evaluation's task prompts, so that the template's
tokens are there as in use while the content is about other entities than any library's.

Shape letters as docs/method.md: L layers, B batch, T tokens, I input width.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from lag_jax.text.tokenizer import right_pad


@jax.tree_util.register_pytree_node_class
class InputRecorder:
  """An AdapterHook that adds nothing and returns each module's input as telemetry
  (stacked by the decoder to [L, B, T, I] per module)."""

  def __init__(self, modules, num_layers: int, out_dims: dict):
    self.modules, self.num_layers, self.out_dims = tuple(modules), num_layers, out_dims

  def tree_flatten(self):
    return (), (self.modules, self.num_layers, self.out_dims)

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*aux)

  def per_layer(self):
    return jnp.arange(self.num_layers)

  def delta(self, layer, name, x):
    if name not in self.modules:
      return None, None
    return jnp.zeros((*x.shape[:2], self.out_dims[name]), x.dtype), (x,)


def recorder(model, modules) -> InputRecorder:
  """An InputRecorder for ``modules`` of ``model``."""
  shapes = model.config.module_shapes()
  unknown = sorted(set(modules) - set(shapes))
  if unknown:
    raise ValueError(f"input recorder: the model has no modules {unknown}")
  return InputRecorder(modules, model.config.num_hidden_layers, {m: shapes[m][0] for m in modules})


@functools.partial(jax.jit, static_argnums=0)
def module_inputs(graphdef, state, tokens, hook):
  """The recorder's telemetry (module -> ([L, B, T, I],)) of one cache-free forward
  pass; hidden states, not logits: nothing reads the vocabulary-wide head here."""
  model = nnx.merge(graphdef, state)
  return model(tokens, lora=hook, return_hidden=True, return_aux=True)[2]


@functools.partial(jax.jit, donate_argnums=0)
def _accumulate(total, x, real):
  """total [L, I, I] += the real tokens' x x^T: x [L, B, T, I], real [B, T]."""
  x = jnp.where(real[None, :, :, None], x, 0).astype(jnp.float32)
  return total + jnp.einsum("lbti,lbtj->lij", x, x)


def input_moments(
  model, sequences: list[list[int]], modules, batch_size: int = 16
) -> tuple[dict[str, np.ndarray], int]:
  """The second moment of each module's input over the sequences' tokens.

  Args:
    model: the base model (no adapters).
    sequences: token ids, one list per text (each run on its own, padded in batches).
    modules: the routed modules (e.g. a library's ``modules``).
  Returns:
    (module -> [L, I, I] float32 E[x x^T] per layer, tokens counted).
  Raises:
    ValueError: without any token, or for a module the model does not have.
  """
  sequences = [list(s) for s in sequences if len(s)]
  if not sequences:
    raise ValueError("input moments: no calibration tokens")
  hook = recorder(model, modules)
  graphdef, state = nnx.split(model)
  L = model.config.num_hidden_layers
  widths = {m: model.config.module_shapes()[m][1] for m in modules}  # (O, I)
  totals = {m: jnp.zeros((L, widths[m], widths[m]), jnp.float32) for m in modules}
  count, t0 = 0, time.perf_counter()
  for start in range(0, len(sequences), batch_size):
    chunk = sequences[start : start + batch_size]
    # Lengths padded to a multiple of 32 so the forward pass is reused across batches.
    batch, real = right_pad(chunk, 32)
    aux = module_inputs(graphdef, state, jnp.asarray(batch), hook)
    for m in modules:
      totals[m] = _accumulate(totals[m], aux[m][0], jnp.asarray(real))
    count += int(real.sum())
  logging.info(
    "input moments: %d sequences, %d tokens in %.1f s",
    len(sequences),
    count,
    time.perf_counter() - t0,
  )
  return {m: np.asarray(v) / count for m, v in totals.items()}, count


def generic_prompts(tokenizer, questions: int = 150, claims: int = 75, seed: int = 0) -> list[str]:
  """The default calibration text: ``questions`` FanOutQA single-hop questions in the
  QA prompt and ``claims`` Wikipedia first sentences in the fact-checking prompt, chat
  rendered as the evaluation renders its requests (eval/prompts.py). Real assets
  (fetched into the cache); about entities of the real world, none of a synthetic
  library's."""
  from lag_jax.data import read_wiki_summaries
  from lag_jax.data.fanoutqa import read_single_hop
  from lag_jax.data.records import KiltExample
  from lag_jax.eval.prompts import render_prompt

  rng = np.random.default_rng(seed)
  hops = read_single_hop()
  docs = read_wiki_summaries()
  examples = [
    KiltExample(id=f"q{i}", input=hops[i].question, answers=("-",), provenance=("-",), task="qa")
    for i in rng.choice(len(hops), min(questions, len(hops)), replace=False)
  ]
  for i in rng.choice(len(docs), min(claims, len(docs)), replace=False):
    claim = docs[i].text.split(". ")[0][:300]
    examples.append(
      KiltExample(id=f"c{i}", input=claim, answers=("-",), provenance=("-",), task="fact")
    )
  return [render_prompt(tokenizer, ex)[0] for ex in examples]


def generic_moments(model, tokenizer, modules, questions: int = 150, claims: int = 75):
  """``input_moments`` over ``generic_prompts``: module -> [L, I, I]."""
  prompts = generic_prompts(tokenizer, questions, claims)
  seqs = [tokenizer.backend.encode(p, add_special_tokens=False).ids for p in prompts]
  return input_moments(model, seqs, modules)[0]
