"""lag_jax.text.tokenizer against transformers.PreTrainedTokenizerFast on tiny folders."""

from __future__ import annotations

import json

import jinja2
import pytest
import tokenizers
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from lag_jax.text.tokenizer import Tokenizer, TokenizerFileError

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# A ChatML template exercising what real templates use: loop.first, bos_token,
# raise_exception, the tojson filter, loop controls, trim_blocks/lstrip_blocks.
CHATML = """{{ bos_token }}
{% for message in messages %}
  {% if message['role'] not in ['system', 'user', 'assistant'] %}
    {{ raise_exception('unknown role ' + message['role']) }}
  {% endif %}
  {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are helpful.<|im_end|>
  {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}
{%- if message.meta is defined %} {{ message.meta | tojson }}{% endif %}<|im_end|>
  {% if message['role'] == 'stop' %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

CORPUS = [
  "The capital of France is Paris. It has 2,102,650 residents.",
  "Héllo wörld! Tokenizers split bytes; digits like 12345 and 2024 too.",
  "What is the capital of France? The answer is Paris, of course.",
] * 20

TEXTS = [
  "What is the capital of France? 12345",
  "  leading spaces and trailing  ",
  "<|im_start|>user\nhi<|im_end|>\n",
  "ünïcödé, emoji 🙂 and tabs\tand\nnewlines",
  "",
]

MESSAGES = [
  [{"role": "user", "content": "What is the capital of France?"}],
  [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Hi", "meta": {"lang": "en", "é": [1, 2]}},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye", "name": None},
  ],
]


def _train_bpe(digits: bool = True) -> tokenizers.Tokenizer:
  """A small byte-level BPE, the same kind as SmolLM2's."""
  tok = tokenizers.Tokenizer(models.BPE())
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.pre_tokenizer = (
    pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if digits
    else byte_level
  )
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(
    vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  tok.train_from_iterator(CORPUS, trainer)
  return tok


def _write_folder(path, tok=None, tokenizer_config=None, config=None, jinja=None):
  (tok or _train_bpe()).save(str(path / "tokenizer.json"))
  if tokenizer_config is not None:
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
  if config is not None:
    (path / "config.json").write_text(json.dumps(config))
  if jinja is not None:
    (path / "chat_template.jinja").write_text(jinja)
  return path


def _chatml_config(**extra):
  return {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "unk_token": "<|endoftext|>",
    "chat_template": CHATML,
    **extra,
  }


@pytest.fixture
def folder(tmp_path):
  return _write_folder(
    tmp_path,
    tokenizer_config=_chatml_config(pad_token="<|endoftext|>"),
    config={"model_type": "llama", "eos_token_id": [2, 0], "bos_token_id": 1},
  )


def _reference(path):
  return transformers.PreTrainedTokenizerFast.from_pretrained(str(path))


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_encode_matches_transformers(folder, add_special_tokens):
  ours, ref = Tokenizer.from_dir(folder), _reference(folder)
  for text in TEXTS:
    assert ours.encode(text, add_special_tokens=add_special_tokens) == ref.encode(
      text, add_special_tokens=add_special_tokens
    ), text


@pytest.mark.parametrize("skip", [False, True])
def test_decode_matches_transformers(folder, skip):
  ours, ref = Tokenizer.from_dir(folder), _reference(folder)
  for text in TEXTS:
    ids = ref.encode(text, add_special_tokens=False)
    assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
      ids, skip_special_tokens=skip
    ), text
    if not skip:
      assert ours.decode(ids, skip_special_tokens=False) == text  # byte-level is lossless


def test_digits_are_split_one_by_one(folder):
  tok = Tokenizer.from_dir(folder)
  ids = tok.encode("12345")
  assert [tok.decode([i]) for i in ids] == list("12345")


@pytest.mark.parametrize("messages", MESSAGES)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(folder, messages, add_generation_prompt):
  ours, ref = Tokenizer.from_dir(folder), _reference(folder)
  got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
  want = ref.apply_chat_template(
    messages, add_generation_prompt=add_generation_prompt, tokenize=False
  )
  assert got == want
  assert got.startswith("<|im_start|>") and got.endswith(
    "<|im_start|>assistant\n" if add_generation_prompt else "<|im_end|>\n"
  )
  assert ours.encode(got) == ref.encode(want, add_special_tokens=False)


def test_chat_template_raise_exception(folder):
  ours, ref = Tokenizer.from_dir(folder), _reference(folder)
  bad = [{"role": "wizard", "content": "x"}]
  with pytest.raises(jinja2.TemplateError, match="unknown role wizard"):
    ours.apply_chat_template(bad)
  with pytest.raises(jinja2.TemplateError, match="unknown role wizard"):
    ref.apply_chat_template(bad, tokenize=False)


def test_template_cannot_escape_the_sandbox(tmp_path):
  evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
  _write_folder(tmp_path, tokenizer_config=_chatml_config(chat_template=evil))
  with pytest.raises(jinja2.exceptions.SecurityError):
    Tokenizer.from_dir(tmp_path).apply_chat_template(MESSAGES[0])


def test_chat_template_jinja_file_takes_precedence(tmp_path):
  _write_folder(
    tmp_path,
    tokenizer_config=_chatml_config(chat_template="config {{ 1 }}"),
    jinja="file {{ messages[0]['content'] }}",
  )
  ours, ref = Tokenizer.from_dir(tmp_path), _reference(tmp_path)
  assert ours.apply_chat_template(MESSAGES[0]) == "file What is the capital of France?"
  assert ours.apply_chat_template(MESSAGES[0]) == ref.apply_chat_template(
    MESSAGES[0], add_generation_prompt=True, tokenize=False
  )


def test_special_token_ids(folder):
  tok, ref = Tokenizer.from_dir(folder), _reference(folder)
  assert tok.bos_token_id == ref.bos_token_id == 1
  # tokenizer_config's eos first, then config.json's, without repeats.
  assert tok.eos_token_ids == (2, 0)
  assert tok.pad_token_id == ref.pad_token_id == 0
  assert tok.vocab_size == len(ref)
  assert tok.token_to_id("<|im_end|>") == 2


def test_ids_fall_back_to_config_and_eos(tmp_path):
  # No tokenizer_config.json at all: bos from config.json, pad falls back to eos.
  _write_folder(tmp_path, config={"bos_token_id": 1, "eos_token_id": 2})
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
  tok = Tokenizer.from_dir(tmp_path)
  assert tok.bos_token_id == 1
  assert tok.eos_token_ids == (2, 5)
  assert tok.pad_token_id == 2


def test_bos_from_post_processor_matches_transformers(tmp_path):
  # Llama 3 style: tokenizer.json's post-processor prepends BOS. add_bos_token in
  # tokenizer_config.json is ignored when tokenizer.json exists (transformers 5).
  tok = _train_bpe()
  tok.post_processor = processors.TemplateProcessing(
    single="<|im_start|> $A", pair="<|im_start|> $A $B", special_tokens=[("<|im_start|>", 1)]
  )
  _write_folder(
    tmp_path, tok=tok, tokenizer_config=_chatml_config(add_bos_token=False, add_eos_token=True)
  )
  ours, ref = Tokenizer.from_dir(tmp_path), _reference(tmp_path)
  for text in TEXTS:
    assert ours.encode(text, add_special_tokens=True) == ref.encode(text), text
  assert ours.encode("hi", add_special_tokens=True)[0] == ours.bos_token_id
  assert ours.encode("hi")[0] != ours.bos_token_id


def test_named_special_token_missing_from_tokenizer_json(tmp_path):
  # bos_token exists only as ordinary vocabulary: it must still be special.
  tok = _train_bpe()
  config = _chatml_config(bos_token="Paris")
  _write_folder(tmp_path, tok=tok, tokenizer_config=config)
  ours, ref = Tokenizer.from_dir(tmp_path), _reference(tmp_path)
  ids = ours.encode("Paris is nice")
  assert ids == ref.encode("Paris is nice", add_special_tokens=False)
  assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


def test_wordlevel_tokenizer(tmp_path):
  # Not every checkpoint is byte-level BPE: a hand-written WordLevel tokenizer.json.
  vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "!": 5}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.decoder = decoders.WordPiece()
  tok.add_special_tokens(["<s>", "</s>"])
  _write_folder(
    tmp_path,
    tok=tok,
    tokenizer_config={
      "bos_token": "<s>",
      "eos_token": {"content": "</s>", "__type": "AddedToken"},
      "unk_token": "[UNK]",
      "clean_up_tokenization_spaces": True,
      "tokenizer_class": "PreTrainedTokenizerFast",
    },
  )
  ours, ref = Tokenizer.from_dir(tmp_path), _reference(tmp_path)
  for text in ["hello world !", "<s> hello mars !</s>"]:
    ids = ours.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False)
    for skip in (False, True):
      assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
  assert ours.decode(ours.encode("hello world !")) == "hello world!"
  assert ours.eos_token_ids == (2,)


def test_missing_tokenizer_json(tmp_path):
  with pytest.raises(TokenizerFileError, match=r"tokenizer\.json"):
    Tokenizer.from_dir(tmp_path)


def test_unreadable_files(tmp_path):
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(TokenizerFileError, match=r"tokenizer\.json"):
    Tokenizer.from_dir(tmp_path)
  _write_folder(tmp_path)
  (tmp_path / "tokenizer_config.json").write_text("[1, 2")
  with pytest.raises(TokenizerFileError, match=r"tokenizer_config\.json"):
    Tokenizer.from_dir(tmp_path)


def test_missing_chat_template(tmp_path):
  _write_folder(tmp_path, tokenizer_config={"eos_token": "<|im_end|>"})
  tok = Tokenizer.from_dir(tmp_path)
  assert tok.encode("hi")  # the rest still works
  with pytest.raises(TokenizerFileError, match=r"tokenizer_config\.json.*chat_template"):
    tok.apply_chat_template(MESSAGES[0])


def test_right_pad_rounds_the_length_and_marks_real_tokens():
  import numpy as np

  from lag_jax.text.tokenizer import right_pad

  tokens, real = right_pad([[5, 6, 7], [8], []], multiple=4)
  np.testing.assert_array_equal(tokens, [[5, 6, 7, 0], [8, 0, 0, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(real.sum(1), [3, 1, 0])
  assert tokens.dtype == np.int32 and real.dtype == bool
  assert right_pad([[1, 2]])[0].shape == (1, 2)
