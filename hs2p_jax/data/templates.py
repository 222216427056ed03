"""Prompt formats: NeMo SteerLM (`<extra_id_*>` markers) or the tokenizer's own chat template.

A multi-turn prompt follows the HelpSteer2 convention: every turn but the last assistant turn,
starting with the first user turn's text, later turns introduced by `USER_MARK` / `ASSISTANT_MARK`.

Which format NVIDIA used in training is not verified (NeMo's data scripts write SteerLM; the
released HF checkpoint is scored with the Llama-3.1 chat template), so both are offered and
`data.template="steerlm"` is the default. No BOS token is added in either format (also unverified).

Every rendering is returned as five pieces (head, prompt, mid, response, tail) whose concatenation
is the full text, so that over-long inputs can be cut inside the prompt or response only.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple, Optional

from hs2p_jax.errors import UserError

STEERLM_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                  "The assistant gives helpful, detailed, and polite answers to the user's questions.")
USER_MARK = "\n<extra_id_1>User\n"
ASSISTANT_MARK = "\n<extra_id_1>Assistant\n"
STEERLM_HEAD = f"<extra_id_0>System\n{STEERLM_SYSTEM}{USER_MARK}"
STEERLM_TAIL = "\n<extra_id_2>"
TEMPLATES = ("steerlm", "chat")
_TURN_SPLIT = re.compile(r"\n<extra_id_1>(User|Assistant)\n")


class Pieces(NamedTuple):
  """A rendered example: head + prompt + mid + response + tail is the full text."""

  head: str
  prompt: str
  mid: str
  response: str
  tail: str

  @property
  def text(self) -> str:
    return "".join(self)


def steerlm_text(prompt: str, response: str) -> str:
  """The NeMo reward-model input: System, User, Assistant turns, ending with `<extra_id_2>`."""
  return f"{STEERLM_HEAD}{prompt}{ASSISTANT_MARK}{response}{STEERLM_TAIL}"


def steerlm_generation_prompt(prompt: str) -> str:
  """`steerlm_text` up to and including the `<extra_id_1>Assistant\\n` line."""
  return f"{STEERLM_HEAD}{prompt}{ASSISTANT_MARK}"


def split_turns(prompt: str) -> list[dict[str, str]]:
  """A HelpSteer2 multi-turn prompt -> chat messages [{"role": "user"|"assistant", "content"}]."""
  parts = _TURN_SPLIT.split(prompt)
  messages = [{"role": "user", "content": parts[0]}]
  for role, content in zip(parts[1::2], parts[2::2]):
    messages.append({"role": role.lower(), "content": content})
  return messages


def join_turns(messages: list[dict[str, str]]) -> str:
  """Chat messages (starting with a user turn) -> a HelpSteer2 multi-turn prompt."""
  if not messages or messages[0]["role"] != "user":
    raise ValueError("a prompt must start with a user turn")
  out = [messages[0]["content"]]
  for m in messages[1:]:
    out.append((USER_MARK if m["role"] == "user" else ASSISTANT_MARK) + m["content"])
  return "".join(out)


def render(template: str, prompt: str, response: Optional[str] = None, tokenizer: Any = None) -> Pieces:
  """`prompt` (+ `response`) in `template`; without a response, the generation prompt (tail "")."""
  if template == "steerlm":
    if response is None:
      return Pieces(STEERLM_HEAD, prompt, ASSISTANT_MARK, "", "")
    return Pieces(STEERLM_HEAD, prompt, ASSISTANT_MARK, response, STEERLM_TAIL)
  if template == "chat":
    return _render_chat(tokenizer, prompt, response)
  raise UserError(f"data.template={template!r}: expected one of {', '.join(TEMPLATES)}")


def _render_chat(tokenizer: Any, prompt: str, response: Optional[str]) -> Pieces:
  if tokenizer is None or not getattr(tokenizer, "chat_template", None):
    raise UserError("data.template=chat: the tokenizer has no chat template")
  messages = split_turns(prompt)
  if response is None:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  else:
    text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
  spans, pos = [], 0
  for m in messages + ([{"content": response}] if response is not None else []):
    needle = m["content"].strip() or m["content"]
    start = text.find(needle, pos)
    if start < 0:
      raise UserError("data.template=chat: the tokenizer's chat template rewrites message text; "
                      "use data.template=steerlm")
    pos = start + len(needle)
    spans.append((start, pos))
  p0, p1 = spans[0][0], spans[len(messages) - 1][1]
  if response is None:
    return Pieces(text[:p0], text[p0:p1], text[p1:], "", "")
  r0, r1 = spans[-1]
  return Pieces(text[:p0], text[p0:p1], text[p1:r0], text[r0:r1], text[r1:])



class Frame(NamedTuple):
  """What a single-turn rendering puts around the prompt and the response (a multi-turn prompt's
  inner turns are part of its prompt); `strip`: whitespace at the edges of the texts is the frame's."""

  head: str
  mid: str
  tail: str
  strip: bool


def template_frame(template: str, tokenizer: Any = None) -> Frame:
  """`template`'s frame (the chat template's, rendered around placeholder texts)."""
  if template == "steerlm":
    return Frame(STEERLM_HEAD, ASSISTANT_MARK, STEERLM_TAIL, False)
  p = render(template, "\x00PROMPT\x00", "\x00RESPONSE\x00", tokenizer)
  return Frame(p.head, p.mid, p.tail, True)


def split_rendered(text: str, frame: Frame) -> Optional[Pieces]:
  """A rendered prompt + response -> the pieces `render` made of it; None if `text` is not in `frame`."""
  head, mid, tail, strip = frame
  if not (text.startswith(head) and text.endswith(tail)) or len(text) < len(head) + len(tail):
    return None
  body = text[len(head):len(text) - len(tail)]
  cut = body.rfind(mid)
  if cut < 0:
    return None
  prompt, response = body[:cut], body[cut + len(mid):]
  (p0, p1), (r0, r1) = (_edges(prompt), _edges(response)) if strip else ((0, len(prompt)), (0, len(response)))
  return Pieces(head + prompt[:p0], prompt[p0:p1], prompt[p1:] + mid + response[:r0], response[r0:r1],
                response[r1:] + tail)


def _edges(content: str) -> tuple[int, int]:
  """The span of `content` that `render` finds as the text (stripped, unless that leaves nothing)."""
  stripped = content.strip()
  if not stripped:
    return 0, len(content)
  start = content.find(stripped)
  return start, start + len(stripped)
