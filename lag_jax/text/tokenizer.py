"""A checkpoint's tokenizer and chat template, without transformers.

Reads any HF checkpoint folder that has a ``tokenizer.json`` (the `tokenizers`
serialisation), plus ``tokenizer_config.json``, ``config.json``,
``generation_config.json`` and ``chat_template.jinja`` where present. Encoding,
decoding and chat-template rendering follow what
``transformers.PreTrainedTokenizerFast`` does with the same folder.
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import tokenizers

from lag_jax.errors import UserError


class TokenizerFileError(UserError):
  """A tokenizer file is missing, unreadable, or lacks something asked of it."""


def right_pad(sequences: Sequence[Sequence[int]], multiple: int = 1):
  """Token id lists as one right-padded batch: (tokens [B, T] int32, zeros past each
  row's end; real [B, T] bool, its tokens), T the longest row rounded up to
  ``multiple`` (so that batches of nearby lengths share one compiled program)."""
  T = max(map(len, sequences))
  T += -T % multiple
  tokens = np.zeros((len(sequences), T), np.int32)
  real = np.zeros((len(sequences), T), bool)
  for i, row in enumerate(sequences):
    tokens[i, : len(row)], real[i, : len(row)] = row, True
  return tokens, real


def _read_json(path: pathlib.Path, required: bool) -> dict[str, Any]:
  if not path.is_file():
    if required:
      raise TokenizerFileError(f"{path}: file not found")
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise TokenizerFileError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(d, dict):
    raise TokenizerFileError(f"{path}: expected a JSON object, got {type(d).__name__}")
  return d


def _token_content(value: Any) -> str | None:
  """A special token in tokenizer_config.json: a string, or a serialised AddedToken."""
  if isinstance(value, Mapping):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _as_ids(value: Any) -> list[int]:
  """An ``eos_token_id``-style field: None, an int, or a list of ints."""
  if value is None:
    return []
  if isinstance(value, int):
    return [value]
  return [int(v) for v in value]


def _compile_template(source: str) -> jinja2.Template:
  """Compiles a chat template in an environment like HF's.

  Chat templates come with checkpoints and are untrusted code, hence the
  sandbox. ``trim_blocks``/``lstrip_blocks``, the ``loopcontrols`` extension, the
  ``tojson`` filter and the globals match transformers, so templates written for
  it render the same here.
  """

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters, which would change prompts.
    return json.dumps(
      x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )

  def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
  )
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env.from_string(source)


class Tokenizer:
  """Encodes, decodes and applies the chat template of an HF checkpoint.

  Attributes:
    path: the checkpoint folder it was loaded from.
    backend: the underlying ``tokenizers.Tokenizer``.
    bos_token, eos_token, pad_token, unk_token: special token strings or None.
    chat_template: the jinja2 source of the chat template, or None.
  """

  def __init__(
    self,
    backend: tokenizers.Tokenizer,
    tokenizer_config: Mapping[str, Any],
    model_config: Mapping[str, Any] | None = None,
    generation_config: Mapping[str, Any] | None = None,
    chat_template: str | None = None,
    path: str | os.PathLike = "<memory>",
  ):
    """Wraps a loaded tokenizer; most callers want ``Tokenizer.from_dir``.

    Args:
      backend: the ``tokenizers.Tokenizer`` (from tokenizer.json).
      tokenizer_config: the contents of tokenizer_config.json ({} if absent).
      model_config: the contents of config.json, for token ids ({} if absent).
      generation_config: the contents of generation_config.json ({} if absent).
      chat_template: a template that overrides tokenizer_config's.
      path: where these came from, for error messages.
    """
    self.path = pathlib.Path(path)
    self.backend = backend
    self._config = dict(tokenizer_config)
    model_config = model_config or {}
    generation_config = generation_config or {}
    c = self._config
    self.bos_token = _token_content(c.get("bos_token"))
    self.eos_token = _token_content(c.get("eos_token"))
    self.pad_token = _token_content(c.get("pad_token"))
    self.unk_token = _token_content(c.get("unk_token"))

    # transformers registers the named special tokens as special added tokens, so
    # that they are matched whole and dropped by skip_special_tokens.
    missing = [
      t
      for t in (self.bos_token, self.eos_token, self.pad_token, self.unk_token)
      if t is not None and t not in self._special_contents()
    ]
    if missing:
      backend.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)]
      )

    # tokenizer.json's post-processor alone decides what add_special_tokens adds
    # (e.g. Llama 3's BOS): transformers >= 5 drops tokenizer_config's
    # add_bos_token / add_eos_token when a tokenizer.json exists.

    if chat_template is None:
      chat_template = c.get("chat_template")
    if isinstance(chat_template, list):
      # Named templates ([{"name", "template"}]); the default one is for plain chat.
      named = {t["name"]: t["template"] for t in chat_template}
      chat_template = named.get("default")
    self.chat_template: str | None = chat_template
    self._compiled: jinja2.Template | None = None

    self.bos_token_id = self._id(self.bos_token)
    if self.bos_token_id is None and model_config.get("bos_token_id") is not None:
      self.bos_token_id = int(model_config["bos_token_id"])
    eos = (
      [self._id(self.eos_token)]
      + _as_ids(model_config.get("eos_token_id"))
      + _as_ids(generation_config.get("eos_token_id"))
    )
    self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in eos if i is not None))
    pad = self._id(self.pad_token)
    if pad is None and model_config.get("pad_token_id") is not None:
      pad = int(model_config["pad_token_id"])
    if pad is None and self.eos_token_ids:
      pad = self.eos_token_ids[0]
    self.pad_token_id: int | None = pad

  @classmethod
  def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
    """Loads the tokenizer of an HF checkpoint folder.

    Args:
      path: a folder holding tokenizer.json, and optionally tokenizer_config.json,
        config.json, generation_config.json and chat_template.jinja.
    Raises:
      TokenizerFileError: naming the file, if tokenizer.json is missing or any of
        the files is unreadable.
    """
    path = pathlib.Path(path)
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
      raise TokenizerFileError(f"{tok_file}: file not found (need a `tokenizers` tokenizer.json)")
    try:
      backend = tokenizers.Tokenizer.from_file(str(tok_file))
    except Exception as e:  # tokenizers raises a bare Exception on parse errors
      raise TokenizerFileError(f"{tok_file}: cannot load ({e})") from None
    template = None
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
      # transformers saves the template here instead of in tokenizer_config.json
      # since 4.43, and prefers it when both exist.
      template = jinja_file.read_text(encoding="utf-8")
    return cls(
      backend,
      tokenizer_config=_read_json(path / "tokenizer_config.json", required=False),
      model_config=_read_json(path / "config.json", required=False),
      generation_config=_read_json(path / "generation_config.json", required=False),
      chat_template=template,
      path=path,
    )

  @property
  def vocab_size(self) -> int:
    """Number of token ids the tokenizer knows, added tokens included.

    May be smaller than the model's ``vocab_size`` (embedding rows are often padded).
    """
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """Text -> token ids.

    Args:
      text: the string to encode. Special tokens written in it (``<|im_start|>``)
        become their ids.
      add_special_tokens: run the post-processor (e.g. prepend BOS for Llama).
        Off by default because chat templates already write BOS themselves.
    Returns:
      [T] token ids.
    """
    return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    """Token ids [T] -> text, by default without special tokens."""
    text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
    if self._config.get("clean_up_tokenization_spaces") and not isinstance(
      self.backend.model, tokenizers.models.BPE
    ):
      # transformers >= 5 skips this WordPiece-era cleanup for BPE, where it would
      # delete real spaces.
      text = _clean_up_tokenization(text)
    return text

  def token_to_id(self, token: str) -> int | None:
    return self.backend.token_to_id(token)

  def apply_chat_template(
    self,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    **template_vars: Any,
  ) -> str:
    """Renders a conversation with the checkpoint's own chat template.

    Args:
      messages: dicts with at least ``role`` and ``content``. Keys whose value
        is None are dropped, as transformers does, so templates see them as absent.
      add_generation_prompt: end with the header that opens an assistant turn.
      **template_vars: extra variables for the template (e.g. ``tools``), which
        override the special-token variables of the same name.
    Returns:
      The prompt text; encode it with ``encode(text)`` (no added special tokens:
      the template writes them).
    Raises:
      TokenizerFileError: if the checkpoint has no chat template.
      jinja2.TemplateError: if the template rejects the conversation
        (``raise_exception``) or is malformed.
    """
    if self.chat_template is None:
      raise TokenizerFileError(
        f"{self.path / 'tokenizer_config.json'}: no 'chat_template' (and no "
        f"{self.path / 'chat_template.jinja'}); this checkpoint has no chat template"
      )
    if self._compiled is None:
      self._compiled = _compile_template(self.chat_template)
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    variables = {
      "bos_token": self.bos_token,
      "eos_token": self.eos_token,
      "pad_token": self.pad_token,
      "unk_token": self.unk_token,
    }
    variables.update(template_vars)
    return self._compiled.render(
      messages=messages, add_generation_prompt=add_generation_prompt, **variables
    )

  def _special_contents(self) -> set[str]:
    return {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}

  def _id(self, token: str | None) -> int | None:
    return None if token is None else self.backend.token_to_id(token)


def _clean_up_tokenization(text: str) -> str:
  """transformers' ``clean_up_tokenization``: drops spaces before punctuation."""
  for a, b in (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
  ):
    text = text.replace(a, b)
  return text
