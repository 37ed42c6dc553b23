"""GGUF -> HF conversion, round-tripped through a tiny GGUF written like llama.cpp does."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import safetensors.numpy
import tokenizers
import torch
import transformers
from hf_models import tiny_hf_model
from tokenizers import decoders, models, pre_tokenizers, trainers

from lag_jax.checkpoints.gguf import GGUFConversionError, gguf_to_hf
from lag_jax.text.tokenizer import Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = (
  "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
  "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
  "The capital of France is Paris, population 2102650.",
  "Byte-level BPE: héllo wörld, 42 + 7 = 49.",
] * 10


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (HF halves -> GGUF pairs)."""
  return (
    w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  )


def _train_tokenizer(vocab_size: int) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ]
  )
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=SPECIALS,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(CORPUS, trainer)
  assert tok.get_vocab_size() == vocab_size
  return tok


def _write_gguf(path, model, tok, skip=(), reshape=None):
  """Writes `model` (an HF Llama) and `tok` as llama.cpp's converter would."""
  c = model.config
  H, K = c.num_attention_heads, c.num_key_value_heads
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(H)
  w.add_head_count_kv(K)
  w.add_key_length(c.head_dim)
  w.add_value_length(c.head_dim)
  w.add_rope_dimension_count(c.head_dim)
  w.add_rope_freq_base(c.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_vocab_size(c.vocab_size)
  data = json.loads(tok.to_str())
  vocab = sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1])
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list([t for t, _ in vocab])
  w.add_token_types([3 if t in SPECIALS else 1 for t, _ in vocab])
  w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_unk_token_id(0)
  w.add_chat_template(TEMPLATE)

  names = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
  }
  for key, t in model.state_dict().items():
    a = t.numpy().astype(np.float32)
    if key == "model.embed_tokens.weight":
      name = "token_embd.weight"
    elif key == "model.norm.weight":
      name = "output_norm.weight"
    elif key == "lm_head.weight":
      if c.tie_word_embeddings:
        continue
      name = "output.weight"
    else:
      _, _, i, *mod, _ = key.split(".")
      mod = ".".join(mod)
      name = f"blk.{i}.{names[mod]}.weight"
      if mod == "self_attn.q_proj":
        a = _llama_cpp_permute(a, H)
      elif mod == "self_attn.k_proj":
        a = _llama_cpp_permute(a, K)
    if name in skip:
      continue
    if reshape and name in reshape:
      a = a.reshape(reshape[name])
    w.add_tensor(name, a)  # the writer lists dims innermost first, like llama.cpp
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.fixture(scope="module")
def tokenizer():
  return _train_tokenizer(vocab_size=300)


def _tiny(tied, attention="gqa"):
  return tiny_hf_model(
    "llama", attention, tied=tied, vocab_size=300, rope_scaling=None, rope_theta=50000.0
  )


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("attention", ["gqa", "mha"])
def test_roundtrip_matches_transformers(tmp_path, tokenizer, tied, attention):
  model = _tiny(tied, attention)
  _write_gguf(tmp_path / "m.gguf", model, tokenizer)
  out = gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")

  # Tensors: exact, since F32 GGUF tensors are stored losslessly and the rope
  # row permutation is undone.
  got = safetensors.numpy.load_file(out / "model.safetensors")
  want = {
    k: v.numpy() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")
  }
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == np.float32
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)

  config = json.loads((out / "config.json").read_text())
  c = model.config
  for key in (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "tie_word_embeddings",
    "rms_norm_eps",
  ):
    assert config[key] == getattr(c, key), key
  assert config["rope_theta"] == 50000.0
  assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)

  # transformers loads the folder and computes the same logits.
  loaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  tokens = torch.tensor([[1, 17, 42, 99, 3, 7, 64, 120, 5, 33, 11, 2]])
  with torch.no_grad():
    np.testing.assert_allclose(
      loaded(tokens).logits.numpy(), model(tokens).logits.numpy(), atol=1e-5
    )


def test_tokenizer_roundtrip(tmp_path, tokenizer):
  _write_gguf(tmp_path / "m.gguf", _tiny(True), tokenizer)
  out = gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")
  ours = Tokenizer.from_dir(out)
  ref = transformers.AutoTokenizer.from_pretrained(str(out))
  texts = [
    "The capital of France is Paris, population 2102650.",
    " héllo  wörld\n\t42",
    "<|im_start|>user\nhi<|im_end|>\n",
  ]
  for text in texts:
    want = tokenizer.encode(text, add_special_tokens=False).ids
    assert ours.encode(text) == want == ref.encode(text, add_special_tokens=False), text
    assert ours.decode(want, skip_special_tokens=False) == text
  assert [ours.decode([i]) for i in ours.encode("2102650")] == list("2102650")
  assert ours.eos_token_ids == (2,) and ours.bos_token_id == 1
  msgs = [{"role": "user", "content": "hi"}]
  assert ours.apply_chat_template(msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
  assert ours.apply_chat_template(msgs) == ref.apply_chat_template(
    msgs, add_generation_prompt=True, tokenize=False
  )
  tok_config = json.loads((out / "tokenizer_config.json").read_text())
  assert (tok_config["bos_token"], tok_config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
  assert ours.decode(ours.encode("<|im_end|>hi")) == "hi"  # control tokens are special


def test_truncated_file(tmp_path, tokenizer):
  path = tmp_path / "m.gguf"
  _write_gguf(path, _tiny(True), tokenizer)
  data = path.read_bytes()
  for cut in (len(data) - 100, 2000, 10):
    path.write_bytes(data[:cut])
    with pytest.raises(GGUFConversionError, match="m.gguf"):
      gguf_to_hf(path, tmp_path / "hf")


def test_not_a_gguf_file(tmp_path):
  (tmp_path / "x.gguf").write_text("hello")
  with pytest.raises(GGUFConversionError, match=r"x\.gguf.*not a readable GGUF"):
    gguf_to_hf(tmp_path / "x.gguf", tmp_path / "hf")
  with pytest.raises(GGUFConversionError, match="not found"):
    gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "hf")


def test_missing_tensor(tmp_path, tokenizer):
  _write_gguf(tmp_path / "m.gguf", _tiny(True), tokenizer, skip=("blk.1.ffn_up.weight",))
  with pytest.raises(GGUFConversionError, match=r"m\.gguf.*'blk\.1\.ffn_up\.weight'.*missing"):
    gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")


def test_wrong_shape(tmp_path, tokenizer):
  _write_gguf(
    tmp_path / "m.gguf", _tiny(True), tokenizer, reshape={"blk.0.attn_v.weight": (32, 16)}
  )
  with pytest.raises(GGUFConversionError, match=r"'blk\.0\.attn_v\.weight' has shape \(32, 16\)"):
    gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")
