"""Batched KV-cached generation: one prefill pass, then a decode loop in lax.while_loop.

Shapes are bucketed so that compilations stay bounded: prompts are right-padded
to the smallest length bucket P >= the longest prompt, ``max_new_tokens`` is
rounded up to a bucket F (the loop bound itself is a traced scalar), and the
batch is padded to a power of two. Each (B, P, F, sampler) compiles one prefill
and one decode loop, whatever the exact prompt lengths.

Right padding works with the cache because slot j holds position j: sequence b's
first new token goes at position len_b, overwriting the padding there before any
query can attend to it (the causal mask hides the later padding slots).

Weights are arguments of the jitted functions (``nnx.split`` once per call,
``nnx.merge`` inside the trace), never closed-over constants that XLA would
spend minutes constant-folding.

On CPU, ``layer_loop="unrolled"`` runs the decode loop's layers unrolled over
per-layer copies of their weights (``transformer.unstack_layers``): XLA:CPU copies
each scanned slice of the stacked weights before its dot, about a fifth of a
SmolLM2 step. It is not the default: each unrolled compilation maps ~4x more code
pages than the scan's (~1,400 against ~300 for SmolLM2), and a process that
compiles hundreds of programs (a test session, a long evaluation) reached the
kernel's limit on memory mappings (vm.max_map_count) and crashed inside XLA.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import time
import weakref
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx, struct

from lag_jax import distributed
from lag_jax.generation.sampling import Greedy, Sampler
from lag_jax.model.kv_cache import KVCache
from lag_jax.model.layers import RequestLevelHook
from lag_jax.model.transformer import CausalLM, unstack_layers

# Steps of 1.5x and 2x alternately: a prompt pads by at most a third (prefill is
# compute-bound on CPU: with powers of two, 68-token prompts padded to 128), at the
# price of at most twice the compilations of powers of two.
DEFAULT_BUCKETS = (
  32,
  48,
  64,
  96,
  128,
  192,
  256,
  384,
  512,
  768,
  1024,
  1536,
  2048,
  3072,
  4096,
  6144,
  8192,
)

# Token fed for prompt padding and emitted by finished sequences. Any valid id
# works (it is masked or discarded); 0 keeps the embedding lookup in range.
PAD_ID = 0

# How many times each jitted function has been traced (== compiled), by name.
# Tests use it to check that bucketing bounds the number of compilations.
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


@struct.dataclass
class SamplingState:
  """The decode loop's carry.

  Attributes:
    tokens: [B, F] int32 new tokens; column i holds every sequence's i-th new
      token. Columns >= step, and those after a sequence finished, hold PAD_ID.
    positions: [B] int32 position of each sequence's latest token (the one the
      next step feeds): prompt length + step - 1.
    lengths: [B] int32 new tokens per sequence so far, a stop token included.
    done: [B] bool, the sequence emitted a stop token (or is batch padding).
    cache: the KVCache, k and v [L, B, K, S, E] with S = P + F slots (or L
      per-layer [B, K, S, E] arrays for the unrolled decode loop).
    rng: PRNG key, split once per step.
    step: [] int32 columns of ``tokens`` filled so far (the same for all rows).
    logits: [B, F, V] float32 logits each new token was sampled from, or None
      when not recorded (they are large: for tests and debugging).
    routing: the adapter hook's per-token telemetry (e.g. the adapter each token
      was routed to), position-indexed: the hook's aux pytree with every [L, B, T]
      leaf turned into a [B, L, S] buffer whose column j is for the token at
      position j (-1 where no real token was fed yet); None when not recorded.
  """

  tokens: jax.Array
  positions: jax.Array
  lengths: jax.Array
  done: jax.Array
  cache: KVCache
  rng: jax.Array
  step: jax.Array
  logits: jax.Array | None
  routing: Any = None


@dataclasses.dataclass
class GenerationOutput:
  """What ``generate`` returns, per input prompt.

  Attributes:
    tokens: the new tokens of each sequence (the prompt is not repeated). A
      sequence that emitted a stop token ends with it.
    finish_reason: 'stop' (ended with a stop token) or 'length' (reached
      max_new_tokens), per sequence.
    prefill_s: seconds of the prefill call, including its compilation the first
      time a shape is seen.
    decode_s: seconds of the decode loop (compilation included likewise).
    num_decode_steps: decode forward passes run, [B, 1] tokens each. The first
      new token comes from prefill, so this is at most max_new_tokens - 1.
    batch_size: the padded batch the model ran on (a power of two).
    prefill_passes: prefills run over the prompts: 2 when a request-level router
      votes first, 3 for a two-round vote (``RoutedAdapters.request_passes``), else 1;
      ``prefill_s`` covers all of them.
    logits: with ``return_logits``, per sequence [len(tokens[b]), V] float32: the
      logits each new token was chosen from; else None.
    routing: with ``return_routing``, the hook's telemetry pytree (for
      RoutedAdapters: module -> tuple over libraries) with leaves [num_prompts, L, S]
      numpy arrays, position-indexed: [b, :, j] is for the token at position j, so
      [b, :, :len(prompt_b) + len(tokens[b]) - 1] covers every token fed to the
      model (the last new token never is); else None.
  """

  tokens: list[list[int]]
  finish_reason: list[str]
  prefill_s: float
  decode_s: float
  num_decode_steps: int
  batch_size: int
  logits: list[np.ndarray] | None = None
  routing: Any = None
  prefill_passes: int = 1


def bucket(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= n; beyond the largest, a multiple of the largest."""
  for b in sorted(buckets):
    if b >= n:
      return b
  top = max(buckets)
  return top * math.ceil(n / top)


def _pad_stop_tokens(stop_tokens: Sequence[int]) -> np.ndarray:
  # A multiple of 8 ids, padded with -1 (never sampled), so that the usual handful
  # of stop tokens does not change the compiled shapes.
  n = max(8, 8 * math.ceil(len(stop_tokens) / 8))
  out = np.full((n,), -1, np.int32)
  out[: len(stop_tokens)] = stop_tokens
  return out


@functools.partial(
  jax.jit,
  static_argnames=(
    "graphdef",
    "sampler",
    "max_new_bucket",
    "cache_dtype",
    "record_logits",
    "record_routing",
    "resolve",
    "per_layer_cache",
  ),
)
def _prefill(
  graphdef,
  params,
  lora,
  tokens,
  prompt_lengths,
  active,
  stop_tokens,
  rng,
  *,
  sampler: Sampler,
  max_new_bucket: int,
  cache_dtype,
  record_logits: bool,
  record_routing: bool,
  resolve: bool = False,
  per_layer_cache: bool = False,
):
  """Runs the prompts and samples the first new token.

  Args:
    tokens: [B, P] int32 right-padded prompts.
    prompt_lengths: [B] int32, >= 1.
    active: [B] bool, False for batch padding rows.
    stop_tokens: [num_stop] int32, -1 padded.
    resolve: the hook computes request-level routing state in this pass
      (``RoutedAdapters.split_aux``).
    per_layer_cache: return the cache as per-layer arrays (``KVCache.unstacked``),
      for the unrolled decode loop: its attention then reads each layer's cache in
      place instead of a slice copied out of the stack every step.
  Returns:
    the SamplingState; with ``resolve``, (SamplingState, the hook's request state).
  """
  TRACE_COUNTS["prefill"] += 1
  if resolve:
    TRACE_COUNTS["resolve"] += 1
  B, P = tokens.shape
  F = max_new_bucket
  logging.info("Compiling prefill for B=%d, P=%d, F=%d, %s", B, P, F, sampler)
  model = nnx.merge(graphdef, params)
  cache = KVCache.zeros(model.config, B, P + F, cache_dtype)
  out = model(tokens, None, cache, lora, return_hidden=True, return_aux=record_routing or resolve)
  h, cache = out[:2]  # h [B, P, D]
  routing = None
  if resolve:
    aux, request_state = lora.split_aux(out[2])
    out = (h, cache, aux)
  if record_routing:
    # [L, B, P, ...] leaves -> [B, L, P + F, ...] buffers holding the real prompt
    # tokens' columns; prompt padding and the columns decode will fill hold -1.
    real = (jnp.arange(P) < prompt_lengths[:, None])[:, None, :]  # [B, 1, P]

    def buffer(a):
      extra = a.ndim - 3
      a = jnp.where(real.reshape(real.shape + (1,) * extra), jnp.swapaxes(a, 0, 1), -1)
      return jnp.pad(a, ((0, 0), (0, 0), (0, F)) + ((0, 0),) * extra, constant_values=-1)

    routing = jax.tree.map(buffer, out[2])
  # The LM head runs on each sequence's last prompt token only, not on all P.
  last = jnp.take_along_axis(h, (prompt_lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
  logits = model.logits(last)[:, 0]  # [B, V]
  rng, key = jax.random.split(rng)
  first = jnp.where(active, sampler.get_next_tokens(logits, key), PAD_ID)
  recorded = None
  if record_logits:
    recorded = jnp.zeros((B, F, logits.shape[-1]), jnp.float32).at[:, 0].set(logits)
  if per_layer_cache:
    cache = cache.unstacked()
  state = SamplingState(
    tokens=jnp.full((B, F), PAD_ID, jnp.int32).at[:, 0].set(first),
    positions=prompt_lengths.astype(jnp.int32),
    lengths=active.astype(jnp.int32),
    done=~active | jnp.isin(first, stop_tokens),
    cache=cache,
    rng=rng,
    step=jnp.ones((), jnp.int32),
    logits=recorded,
    routing=routing,
  )
  return (state, request_state) if resolve else state


@functools.partial(jax.jit, static_argnames=("graphdef", "sampler"), donate_argnames=("state",))
def _decode(
  graphdef,
  params,
  lora,
  state: SamplingState,
  stop_tokens,
  max_new_tokens,
  layer_params=None,
  *,
  sampler: Sampler,
) -> SamplingState:
  """Feeds [B, 1] tokens until max_new_tokens columns are filled or all are done.

  ``layer_params``: per-layer weights (``unstack_layers``) for the unrolled layer
  loop, or None for the scan."""
  TRACE_COUNTS["decode"] += 1
  logging.info(
    "Compiling decode loop for tokens %s, cache length %d, %s layers, %s",
    state.tokens.shape,
    state.cache.length,
    "scanned" if layer_params is None else "unrolled",
    sampler,
  )

  def cond(s: SamplingState):
    return (s.step < max_new_tokens) & ~jnp.all(s.done)

  def body(s: SamplingState) -> SamplingState:
    model = nnx.merge(graphdef, params)
    last = jax.lax.dynamic_index_in_dim(s.tokens, s.step - 1, axis=1)  # [B, 1]
    out = model(
      last,
      s.positions[:, None],
      s.cache,
      lora,
      return_aux=s.routing is not None,
      layer_params=layer_params,
    )
    logits, cache = out[0][:, 0], out[1]  # logits [B, V]
    routing = s.routing
    if routing is not None:
      rows = jnp.arange(last.shape[0])
      # Leaves [L, B, 1, ...] go to column positions[b] of row b; the index
      # .at[rows, :, positions] selects [B, L, ...].
      routing = jax.tree.map(
        lambda buf, a: buf.at[rows, :, s.positions].set(jnp.swapaxes(a[:, :, 0], 0, 1)),
        routing,
        out[2],
      )
    rng, key = jax.random.split(s.rng)
    nxt = jnp.where(s.done, PAD_ID, sampler.get_next_tokens(logits, key))
    recorded = s.logits
    if recorded is not None:
      recorded = jax.lax.dynamic_update_index_in_dim(recorded, logits, s.step, axis=1)
    return SamplingState(
      tokens=jax.lax.dynamic_update_index_in_dim(s.tokens, nxt, s.step, axis=1),
      positions=s.positions + 1,
      lengths=s.lengths + (~s.done).astype(jnp.int32),
      done=s.done | jnp.isin(nxt, stop_tokens),
      cache=cache,
      rng=rng,
      step=s.step + 1,
      logits=recorded,
      routing=routing,
    )

  return jax.lax.while_loop(cond, body, state)


def generate(
  model: CausalLM,
  prompts: Sequence[Sequence[int]],
  *,
  max_new_tokens: int,
  sampler: Sampler | None = None,
  stop_tokens: Sequence[int] = (),
  seed: int = 0,
  lora: Any = None,
  buckets: Sequence[int] = DEFAULT_BUCKETS,
  cache_dtype=None,
  return_logits: bool = False,
  return_routing: bool = False,
  batch_sharding: jax.sharding.NamedSharding | None = None,
  layer_loop: str = "scan",
) -> GenerationOutput:
  """Generates up to ``max_new_tokens`` new tokens after each prompt.

  With the model on a mesh over several processes, every process calls this with
  the same arguments and gets the same result.

  Args:
    model: the causal LM.
    prompts: token id lists, of any (non-zero) lengths.
    max_new_tokens: >= 1; sequences that emit no stop token get exactly this many.
    sampler: Greedy() (the default) or Sample(...); see ``sampling``.
    stop_tokens: ids that end a sequence (kept as its last token). Pass the
      tokenizer's EOS here; nothing is implied from the model config.
    seed: the same seed, prompts and shapes give the same tokens.
    lora: adapters as ``CausalLM.__call__`` takes them (a dict of LoraWeights or an
      AdapterHook; both pytrees), or None. A hook with per-request arrays must have
      ``pad_batch(batch)``: it is called when the batch is padded. A hook whose
      ``request_passes`` is 1 or 2 (request-level routing, RoutedAdapters) gets its
      span fitted (``for_prompts``) and its request-level state from the prefill
      (1), or from a first prefill before the one whose cache decode uses (2).
    buckets: allowed padded prompt lengths and max_new_tokens roundings.
    cache_dtype: KV cache dtype; default the model's compute dtype.
    return_logits: also return the logits each new token was sampled from.
    return_routing: also return the hook's per-token telemetry (``routing``).
    batch_sharding: how the batch's rows are split over the model's mesh, e.g.
      ``NamedSharding(mesh, P('data'))``: the batch is padded to a multiple of the
      split and each process places only its own devices' rows of the prompts.
      Default: the inputs are replicated.
    layer_loop: how decode runs the layers: "scan" (over the stacked weights;
      compile time flat in depth; the default) or "unrolled" (over per-layer
      copies of the weights, made once per model and kept while it lives: no
      per-step slice copies on CPU, 1.2-1.4x faster decode there without routed
      adapters, at the price of that memory, of compile time growing with depth
      and of ~4x more code mappings per compilation; see the module docstring).
      Routed hooks are sliced per layer inside the unrolled loop, which is slow
      for large libraries. Prefill always scans (it is compute-bound).
  Raises:
    ValueError: no prompts, an empty prompt, ids outside the vocabulary, or a
      prompt that with max_new_tokens exceeds max_position_embeddings (naming the
      prompt index and lengths).
  """
  config = model.config
  sampler = Greedy() if sampler is None else sampler
  if not prompts:
    raise ValueError("generate: no prompts given")
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
  context = config.max_position_embeddings
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"generate: prompt {i} is empty")
    if len(p) > context:
      raise ValueError(
        f"generate: prompt {i} has {len(p)} tokens, longer than the model's "
        f"context (max_position_embeddings={context})"
      )
    if len(p) + max_new_tokens > context:
      raise ValueError(
        f"generate: prompt {i} has {len(p)} tokens; with max_new_tokens="
        f"{max_new_tokens} that is {len(p) + max_new_tokens} positions, more "
        f"than the model's context (max_position_embeddings={context})"
      )
    if min(p) < 0 or max(p) >= config.vocab_size:
      raise ValueError(f"generate: prompt {i} has token ids outside [0, {config.vocab_size})")

  num_prompts = len(prompts)
  B = 1 << (num_prompts - 1).bit_length()  # batch padded to a power of two
  if batch_sharding is not None:
    parts = _batch_parts(batch_sharding)
    B = parts * math.ceil(B / parts)
  P = bucket(max(len(p) for p in prompts), buckets)
  F = bucket(max_new_tokens, buckets)
  tokens = np.full((B, P), PAD_ID, np.int32)
  prompt_lengths = np.ones((B,), np.int32)  # padding rows: one pad token, done at once
  active = np.arange(B) < num_prompts
  for i, p in enumerate(prompts):
    tokens[i, : len(p)] = p
    prompt_lengths[i] = len(p)
  stop = _pad_stop_tokens(stop_tokens)
  if batch_sharding is not None:
    tokens, prompt_lengths, active = (
      distributed.put(a, batch_sharding) for a in (tokens, prompt_lengths, active)
    )
  if num_prompts < B and hasattr(lora, "pad_batch"):
    lora = lora.pad_batch(B)
  passes = lora.request_passes if isinstance(lora, RequestLevelHook) else 0
  if passes:
    real_lengths = np.ones((B,), np.int64)
    real_lengths[:num_prompts] = [len(p) for p in prompts]
    lora = lora.for_prompts(np.arange(P)[None, :] < real_lengths[:, None])
  graphdef, params = nnx.split(model)
  cache_dtype = jnp.dtype(cache_dtype or model.dtype)
  layer_params = _layer_params(model, layer_loop)

  t0 = time.perf_counter()
  prefill = functools.partial(
    _prefill,
    graphdef,
    params,
    tokens=tokens,
    prompt_lengths=prompt_lengths,
    active=active,
    stop_tokens=stop,
    rng=jax.random.key(seed),
    sampler=sampler,
    max_new_bucket=F,
    cache_dtype=cache_dtype,
    per_layer_cache=layer_params is not None,
  )
  if passes:
    # Request-level routing: this prefill computes each request's state (votes,
    # request_lag's candidates); with votes (passes >= 2) only that is kept, and a
    # last prefill applies it, so that the cache holds what decode continues. A
    # two-round vote (passes == 3) resolves twice: its finalists, then its winners.
    last = passes == 1
    for _ in range(max(passes - 1, 1)):
      state, request_state = prefill(
        lora=lora,
        record_logits=return_logits and last,
        record_routing=return_routing and last,
        resolve=True,
      )
      lora = lora.with_request_state(request_state)
  if passes != 1:
    state = prefill(
      lora=lora, record_logits=return_logits, record_routing=return_routing, resolve=False
    )
  jax.block_until_ready(state)
  t1 = time.perf_counter()
  state = _decode(
    graphdef, params, lora, state, stop, np.int32(max_new_tokens), layer_params, sampler=sampler
  )
  # Rows split over several processes are gathered: every process gets them all.
  out_tokens, lengths, done, step = distributed.to_host(
    (state.tokens, state.lengths, state.done, state.step)
  )
  t2 = time.perf_counter()

  logits = None
  if return_logits:
    all_logits = distributed.to_host(state.logits)
    logits = [all_logits[i, : lengths[i]] for i in range(num_prompts)]
  routing = None
  if return_routing:
    routing = jax.tree.map(lambda a: a[:num_prompts], distributed.to_host(state.routing))
  return GenerationOutput(
    tokens=[out_tokens[i, : lengths[i]].tolist() for i in range(num_prompts)],
    finish_reason=["stop" if done[i] else "length" for i in range(num_prompts)],
    prefill_s=t1 - t0,
    decode_s=t2 - t1,
    num_decode_steps=int(step) - 1,
    batch_size=B,
    logits=logits,
    routing=routing,
    prefill_passes=max(passes, 1),
  )


# model -> (its stacked layer leaves, their per-layer copies); rebuilt when any
# leaf was replaced (e.g. after loading new weights into the same model).
_UNSTACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layer_params(model: CausalLM, layer_loop: str) -> tuple | None:
  """The per-layer weights decode runs over, or None to scan (see ``generate``)."""
  if layer_loop not in ("scan", "unrolled"):
    raise ValueError(f"generate: layer_loop must be scan or unrolled, got {layer_loop!r}")
  if layer_loop == "scan":
    return None
  leaves = jax.tree.leaves(nnx.state(model.model.layers))
  cached = _UNSTACKED.get(model)
  if (
    cached is None
    or len(cached[0]) != len(leaves)
    or any(a is not b for a, b in zip(cached[0], leaves, strict=True))
  ):
    cached = (leaves, unstack_layers(model))
    _UNSTACKED[model] = cached
  return cached[1]


def _batch_parts(sharding: jax.sharding.NamedSharding) -> int:
  """How many pieces ``sharding`` splits a batch's leading axis into."""
  first = sharding.spec[0] if len(sharding.spec) else None
  axes = () if first is None else (first,) if isinstance(first, str) else tuple(first)
  return math.prod(sharding.mesh.shape[a] for a in axes)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_log_probs(graphdef, params, lora, tokens):
  TRACE_COUNTS["score"] += 1
  model = nnx.merge(graphdef, params)
  logits, _ = model(tokens, lora=lora)  # [B, T, V] float32
  log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  return jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1)[..., 0]


def score(model: CausalLM, tokens, *, lora: Any = None) -> np.ndarray:
  """Per-token log-probabilities of a batch of sequences, without a cache.

  Args:
    tokens: [B, T] int token ids (T >= 2).
  Returns:
    [B, T - 1] float32: entry t is log p(tokens[:, t + 1] | tokens[:, :t + 1]).
  """
  tokens = np.asarray(tokens, np.int32)
  graphdef, params = nnx.split(model)
  return np.asarray(_token_log_probs(graphdef, params, lora, tokens))


def perplexity(
  model: CausalLM,
  token_ids: Sequence[int],
  window: int,
  *,
  stride: int | None = None,
  lora: Any = None,
) -> float:
  """Perplexity of one long token sequence, scored ``window`` tokens at a time.

  Windows start every ``stride`` tokens (default ``window - 1``: consecutive
  windows share one token, so each window predicts all its tokens but the first).
  Each token is scored once, in the first window that predicts it; a smaller
  stride gives every window after the first ``window - stride`` tokens of
  context. The first token is never predicted. Every window is padded to
  ``window`` tokens, so this compiles once.

  Returns:
    exp(mean negative log-likelihood) over the len(token_ids) - 1 predicted tokens.
  """
  ids = np.asarray(token_ids, np.int32)
  n = len(ids)
  stride = window - 1 if stride is None else stride
  if n < 2 or window < 2 or not 1 <= stride < window:
    raise ValueError(
      f"perplexity: need >= 2 tokens, window >= 2 and 1 <= stride < window; "
      f"got {n} tokens, window={window}, stride={stride}"
    )
  nll, count, scored_to, begin = 0.0, 0, 1, 0
  while scored_to < n:
    end = min(begin + window, n)
    chunk = np.full((1, window), PAD_ID, np.int32)
    chunk[0, : end - begin] = ids[begin:end]
    lp = score(model, chunk, lora=lora)[0]  # lp[j] predicts ids[begin + j + 1]
    targets = lp[scored_to - begin - 1 : end - begin - 1]
    nll -= float(np.sum(targets, dtype=np.float64))
    count += len(targets)
    scored_to = end
    begin += stride
  return math.exp(nll / count)
