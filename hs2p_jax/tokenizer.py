"""Tokenizers: a Hugging Face tokenizer from a directory or GGUF file, or the built-in byte tokenizer.

Specs: "bytes" (built in, no network: 256 byte symbols plus special tokens, for the tiny quickstart
model), "gguf:PATH" or "gguf:smollm2" (the tokenizer inside a GGUF file), or a Hugging Face
directory / hub name.
"""

from __future__ import annotations

import functools
import os

from hs2p_jax.errors import UserError

BYTE_SPECIALS = ("<pad>", "<s>", "</s>", "<extra_id_0>", "<extra_id_1>", "<extra_id_2>", "<|im_start|>",
                 "<|im_end|>")
BYTE_OFFSET = 16  # byte b has id BYTE_OFFSET + b; ids below are specials (and spares)
BYTE_VOCAB = BYTE_OFFSET + 256

# ChatML, as SmolLM2; used by the byte tokenizer so that "chat template" formatting works offline.
_CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
           "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer():
  """A byte-level `PreTrainedTokenizerFast` with no merges: every UTF-8 byte is one token."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from tokenizers.pre_tokenizers import ByteLevel
  from transformers import PreTrainedTokenizerFast

  alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins for bytes, in GPT-2's mapping
  byte_to_char = _gpt2_bytes_to_unicode()
  vocab = {tok: i for i, tok in enumerate(BYTE_SPECIALS)}
  for i in range(len(BYTE_SPECIALS), BYTE_OFFSET):
    vocab[f"<unused_{i}>"] = i
  for b in range(256):
    vocab[byte_to_char[b]] = BYTE_OFFSET + b
  assert set(byte_to_char.values()) == set(alphabet)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                 additional_special_tokens=list(BYTE_SPECIALS[3:]))
  fast.chat_template = _CHATML
  return fast


def _gpt2_bytes_to_unicode() -> dict[int, str]:
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=8)
def load_tokenizer(spec: str):
  """A Hugging Face tokenizer for `spec` (see module docstring), with a pad token set."""
  from transformers import AutoTokenizer

  if spec == "bytes":
    tok = byte_tokenizer()
  elif spec.startswith("gguf:"):
    from hs2p_jax.convert.gguf import resolve
    path = resolve(spec[len("gguf:"):])
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  else:
    try:
      tok = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as e:
      raise UserError(f"tokenizer {spec!r}: cannot load ({str(e).splitlines()[0]})") from None
  if tok.pad_token_id is None:
    tok.pad_token = tok.eos_token
  return tok
