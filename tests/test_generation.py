"""Generation: KV-cached decode against the cache-free forward pass and HF generate,
sampling statistics, stop tokens, and the bound on compilations."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import tiny_hf_model

from lag_jax.checkpoints.safetensors_loader import load_model
from lag_jax.generation.generate import TRACE_COUNTS, generate, perplexity, score
from lag_jax.generation.sampling import Greedy, Sample, make_sampler
from lag_jax.model.layers import LoraWeights

# Prompts of different lengths, all in one batch (padded to 4 rows).
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31]]
EOS = 2


def _sharpened_hf_model(**kwargs):
  """A tiny HF model whose logits are far from flat, so argmax is not decided by
  float noise: embeddings and LM head scaled by 10 (once when they are tied)."""
  hf = tiny_hf_model(**kwargs)
  with torch.no_grad():
    hf.model.embed_tokens.weight.mul_(10)
    if not hf.config.tie_word_embeddings:
      hf.lm_head.weight.mul_(10)
  return hf


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """(HF model, our model) for a sharpened tiny Llama with GQA."""
  path = tmp_path_factory.mktemp("llama")
  hf = _sharpened_hf_model(arch="llama", attention="gqa")
  hf.save_pretrained(path)
  return hf, load_model(path)


@functools.partial(jax.jit, static_argnums=0)
def _forward_logits(graphdef, params, tokens, lora):
  """The cache-free forward pass: tokens [B, T] -> logits [B, T, V]."""
  logits, _ = nnx.merge(graphdef, params)(tokens, lora=lora)
  return logits


def _random_lora(model, rank=2, seed=0):
  """LoRA on q_proj and down_proj of every layer, scale folded into b."""
  c = model.config
  shapes = c.module_shapes()
  keys = jax.random.split(jax.random.key(seed), 4)
  lora = {}
  for i, name in enumerate(("q_proj", "down_proj")):
    out_dim, in_dim = shapes[name]
    lora[name] = LoraWeights(
      a=0.3 * jax.random.normal(keys[2 * i], (c.num_hidden_layers, rank, in_dim)),
      b=0.3 * jax.random.normal(keys[2 * i + 1], (c.num_hidden_layers, out_dim, rank)),
    )
  return lora


@pytest.mark.parametrize("layer_loop", ["scan", "unrolled"])
@pytest.mark.parametrize("case", ["llama", "llama_lora", "mistral_window"])
def test_cached_decode_matches_uncached_forward(tmp_path, llama, case, layer_loop):
  if case == "mistral_window":
    # A window shorter than prompt + generation, so decode must mask old slots.
    tiny_hf_model(arch="mistral", attention="gqa", sliding_window=5).save_pretrained(tmp_path)
    model = load_model(tmp_path)
  else:
    _, model = llama
  lora = _random_lora(model) if case == "llama_lora" else None
  out = generate(
    model, PROMPTS, max_new_tokens=8, lora=lora, return_logits=True, layer_loop=layer_loop
  )
  graphdef, params = nnx.split(model)
  for b, prompt in enumerate(PROMPTS):
    new = out.tokens[b]
    assert len(new) == 8 and out.finish_reason[b] == "length"
    full = np.asarray([prompt + new], np.int32)
    # Causal: the logits at position t of one cache-free pass over the whole
    # sequence are those of the pass over the sequence up to t.
    ref = np.asarray(_forward_logits(graphdef, params, full, lora))[0]
    expected = ref[len(prompt) - 1 : len(prompt) - 1 + len(new)]
    np.testing.assert_allclose(out.logits[b], expected, atol=1e-4, rtol=0)
    # And greedy picked the argmax of the reference logits.
    assert new == expected.argmax(-1).tolist()


HF_CASES = [
  dict(arch="llama", attention="gqa"),
  dict(arch="llama", attention="mqa"),
  dict(arch="llama", attention="mha", tied=True),
  dict(arch="mistral", attention="gqa", sliding_window=6),
  dict(arch="qwen2", attention="gqa"),
  dict(arch="qwen3", attention="mqa", tied=True),
]


@pytest.mark.parametrize("case", HF_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_greedy_matches_hf_generate(tmp_path, case):
  hf = _sharpened_hf_model(**case)
  hf.save_pretrained(tmp_path)
  model = load_model(tmp_path)
  max_new = 12
  out = generate(model, PROMPTS, max_new_tokens=max_new, stop_tokens=(EOS,))
  for b, prompt in enumerate(PROMPTS):
    # One prompt at a time, so HF's own padding conventions play no part.
    with torch.no_grad():
      ref = hf.generate(
        torch.tensor([prompt]),
        do_sample=False,
        max_new_tokens=max_new,
        eos_token_id=EOS,
        pad_token_id=0,
      )
    ref_new = ref[0, len(prompt) :].tolist()
    assert out.tokens[b] == ref_new, f"prompt {b}"
    assert out.finish_reason[b] == ("stop" if ref_new[-1] == EOS else "length")


def test_sampling_is_deterministic_per_seed(llama):
  _, model = llama
  sampler = Sample(temperature=1.5)
  a = generate(model, PROMPTS, max_new_tokens=10, sampler=sampler, seed=3)
  b = generate(model, PROMPTS, max_new_tokens=10, sampler=sampler, seed=3)
  c = generate(model, PROMPTS, max_new_tokens=10, sampler=sampler, seed=4)
  assert a.tokens == b.tokens
  assert a.tokens != c.tokens


@pytest.mark.parametrize(
  "sampler",
  [
    Sample(temperature=2.0, top_k=1),
    Sample(temperature=2.0, top_p=1e-6),
    make_sampler("sample", top_k=1, top_p=0.5),
  ],
)
def test_truncated_sampling_to_one_token_is_greedy(llama, sampler):
  _, model = llama
  greedy = generate(model, PROMPTS, max_new_tokens=10, sampler=Greedy())
  for seed in (0, 1):
    assert (
      generate(model, PROMPTS, max_new_tokens=10, sampler=sampler, seed=seed).tokens
      == greedy.tokens
    )


def _frequencies(sampler, logits, n=20_000, seed=0):
  """Empirical distribution of n draws from logits [V] (one batch of n rows)."""
  batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
  draws = np.asarray(sampler.get_next_tokens(batch, jax.random.key(seed)))
  return np.bincount(draws, minlength=len(logits)) / n


def _softmax(x):
  e = np.exp(x - np.max(x))
  return e / e.sum()


LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_sampling_matches_softmax(temperature):
  freq = _frequencies(Sample(temperature=temperature), LOGITS)
  # Total variation of 20k draws over 8 outcomes is about 0.01 at most; a wrong
  # temperature (e.g. 1 instead of 0.5) moves it by > 0.1.
  tv = 0.5 * np.abs(freq - _softmax(LOGITS / temperature)).sum()
  assert tv < 0.02


def test_top_k_and_top_p_sampling_distributions():
  # top-k: the top 3, renormalised.
  freq = _frequencies(Sample(top_k=3), LOGITS)
  expected = np.zeros(8)
  expected[:3] = _softmax(LOGITS[:3])
  assert 0.5 * np.abs(freq - expected).sum() < 0.02
  # top-p: probs [0.5, 0.3, 0.15, 0.05] need the top 2 for p = 0.75 (0.8 >= 0.75)
  # and the top 3 for p = 0.85.
  logits = np.log([0.5, 0.3, 0.15, 0.05])
  for p, keep in ((0.75, 2), (0.85, 3)):
    freq = _frequencies(Sample(top_p=p), logits)
    expected = np.zeros(4)
    expected[:keep] = _softmax(logits[:keep])
    assert 0.5 * np.abs(freq - expected).sum() < 0.02, p


def test_top_k_never_picks_outside_top_k():
  logits = jax.random.normal(jax.random.key(0), (2000, 50))
  draws = np.asarray(Sample(temperature=3.0, top_k=5).get_next_tokens(logits, jax.random.key(1)))
  top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
  assert all(d in row for d, row in zip(draws, top5))


def test_make_sampler_errors():
  assert make_sampler("greedy") == Greedy()
  assert make_sampler("sample", temperature=0.7) == Sample(temperature=0.7)
  with pytest.raises(ValueError, match="unknown sampler 'beam'"):
    make_sampler("beam")
  with pytest.raises(ValueError, match="temperature"):
    make_sampler("sample", temperature=0.0)
  # A config passes all its sampling fields; at neutral values greedy takes them.
  assert make_sampler("greedy", temperature=1.0, top_k=None, top_p=None) == Greedy()
  with pytest.raises(ValueError, match="sampler 'greedy' takes no sampling arguments"):
    make_sampler("greedy", top_k=3)
  with pytest.raises(ValueError, match="bad arguments"):
    make_sampler("sample", beam_width=3)


def test_stop_tokens_end_sequences_independently(llama):
  _, model = llama
  free = generate(model, PROMPTS, max_new_tokens=10)
  seq0, seq1 = free.tokens[0], free.tokens[1]
  # A token that sequence 0 emits at step >= 1 (first time) and sequence 1 never emits.
  i, stop = next(
    (i, t) for i, t in enumerate(seq0) if i >= 1 and t not in seq0[:i] and t not in seq1
  )
  out = generate(model, PROMPTS, max_new_tokens=10, stop_tokens=(stop, 127))
  for b, toks in enumerate(free.tokens):
    cut = [j for j, t in enumerate(toks) if t in (stop, 127)]
    expected = toks[: cut[0] + 1] if cut else toks
    assert out.tokens[b] == expected
    assert out.finish_reason[b] == ("stop" if cut else "length")
  assert out.tokens[0] == seq0[: i + 1] and out.finish_reason[0] == "stop"
  assert out.tokens[1] == seq1 and out.finish_reason[1] == "length"
  # A stop token that comes straight out of prefill.
  first = generate(model, PROMPTS[:1], max_new_tokens=10, stop_tokens=(seq0[0],))
  assert first.tokens == [[seq0[0]]] and first.finish_reason == ["stop"]
  assert first.num_decode_steps == 0


def test_compilations_are_bounded_by_buckets(llama):
  _, model = llama
  before = dict(TRACE_COUNTS)
  # max_new_tokens 50 and 60 share the bucket 64, unused by the other tests.
  for length, max_new in ((3, 50), (5, 60), (9, 50)):
    out = generate(model, [list(range(10, 10 + length))], max_new_tokens=max_new)
    assert len(out.tokens[0]) == max_new and out.batch_size == 1
  assert TRACE_COUNTS["prefill"] - before.get("prefill", 0) == 1
  assert TRACE_COUNTS["decode"] - before.get("decode", 0) == 1


def test_bad_prompts_raise(llama):
  _, model = llama
  context = model.config.max_position_embeddings  # 256
  with pytest.raises(
    ValueError,
    match=r"prompt 1 has 257 tokens, longer than the model's "
    r"context \(max_position_embeddings=256\)",
  ):
    generate(model, [[3], [3] * (context + 1)], max_new_tokens=1)
  with pytest.raises(ValueError, match="prompt 0 has 250 tokens; with max_new_tokens=10"):
    generate(model, [[3] * 250], max_new_tokens=10)
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    generate(model, [[3], []], max_new_tokens=1)
  with pytest.raises(ValueError, match="no prompts"):
    generate(model, [], max_new_tokens=1)
  with pytest.raises(ValueError, match="outside"):
    generate(model, [[3, 128]], max_new_tokens=1)


def test_score_and_perplexity_match_hf(llama):
  hf, model = llama
  ids = [(7 * i + 3) % 128 for i in range(40)]
  with torch.no_grad():
    ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1], -1)
  ref = ref.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
  np.testing.assert_allclose(score(model, [ids])[0], ref, atol=1e-4)
  np.testing.assert_allclose(perplexity(model, ids, window=64), np.exp(-ref.mean()), rtol=1e-5)
  # Windows of 16 every 15 tokens: [0, 16), [15, 31), [30, 40) predict 15 + 15 + 9.
  targets = np.concatenate([score(model, [ids[s : s + 16]])[0] for s in (0, 15, 30)])
  assert len(targets) == len(ids) - 1
  np.testing.assert_allclose(perplexity(model, ids, window=16), np.exp(-targets.mean()), rtol=1e-5)
  # With stride 8, the tokens after the first window are scored with 8 tokens of context.
  targets = np.concatenate(
    [score(model, [ids[:16]])[0]] + [score(model, [ids[s : s + 16]])[0][7:] for s in (8, 16, 24)]
  )
  np.testing.assert_allclose(
    perplexity(model, ids, window=16, stride=8), np.exp(-targets.mean()), rtol=1e-5
  )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _ProbeHook:
  """An AdapterHook that adapts nothing and reports, for every token at q_proj,
  2 * its row's tag + (first input feature > 0): per-request and per-token."""

  tag: jax.Array  # [B] int32

  def per_layer(self):
    return None

  def delta(self, layer_xs, name, x):
    if name != "q_proj":
      return None, None
    return None, (x[..., 0] > 0).astype(jnp.int32) + 2 * self.tag[:, None]

  def pad_batch(self, batch):
    return _ProbeHook(jnp.pad(self.tag, (0, batch - self.tag.shape[0]), constant_values=-7))


@functools.partial(jax.jit, static_argnums=0)
def _forward_aux(graphdef, params, tokens, hook):
  return nnx.merge(graphdef, params)(tokens, lora=hook, return_aux=True)[2]


@pytest.mark.parametrize("layer_loop", ["scan", "unrolled"])
def test_routing_telemetry_is_position_indexed(llama, layer_loop):
  _, model = llama
  tags = jnp.asarray([5, 6, 7], jnp.int32)
  out = generate(
    model,
    PROMPTS,
    max_new_tokens=6,
    lora=_ProbeHook(tags),
    return_routing=True,
    layer_loop=layer_loop,
  )
  routing = out.routing["q_proj"]  # [3, L, S]: three prompts, the padding row dropped
  assert routing.shape[:2] == (3, model.config.num_hidden_layers)
  graphdef, params = nnx.split(model)
  for b, prompt in enumerate(PROMPTS):
    fed = prompt + out.tokens[b][:-1]  # every token that went through the model
    ref = _forward_aux(graphdef, params, np.asarray([fed], np.int32), _ProbeHook(tags[b : b + 1]))
    np.testing.assert_array_equal(routing[b, :, : len(fed)], np.asarray(ref["q_proj"])[:, 0])
    assert (routing[b, :, len(fed) :] == -1).all()  # never fed: still the fill value


def test_unrolled_decode_follows_new_weights(tmp_path):
  """The per-layer weight copies are rebuilt when the model's weights change."""
  tiny_hf_model(arch="llama", attention="gqa").save_pretrained(tmp_path)
  model = load_model(tmp_path)
  before = generate(model, PROMPTS, max_new_tokens=6, return_logits=True, layer_loop="unrolled")
  w = model.model.layers.mlp.down_proj.weight
  w.value = w.value * 3.0
  after = generate(model, PROMPTS, max_new_tokens=6, return_logits=True, layer_loop="unrolled")
  scan = generate(model, PROMPTS, max_new_tokens=6, return_logits=True, layer_loop="scan")
  for b in range(len(PROMPTS)):
    np.testing.assert_allclose(after.logits[b], scan.logits[b], atol=1e-4, rtol=0)
    assert not np.allclose(after.logits[b], before.logits[b], atol=1e-3)
  with pytest.raises(ValueError, match="layer_loop"):
    generate(model, PROMPTS, max_new_tokens=2, layer_loop="loop")
