"""Tokenizers and chat templates."""

from lag_jax.text.tokenizer import Tokenizer, TokenizerFileError

__all__ = ["Tokenizer", "TokenizerFileError"]
