"""A character-level tokenizer in Hugging Face format, for the embedded model.

Saved as tokenizer.json and loaded by `AutoTokenizer.from_pretrained`, the same path a
real checkpoint's tokenizer takes.
"""
from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, EOS = "<pad>", "<eos>"


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Printable ASCII and newline, one token each; unknown characters map to '?'."""
    symbols = [PAD, EOS, *string.printable[:95], "\n"]
    tok = Tokenizer(models.WordLevel(vocab={s: i for i, s in enumerate(symbols)}, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS)
