"""Prompt formats: SteerLM strings byte for byte, multi-turn prompts, the tokenizer's chat template."""

import copy

import pytest

from hs2p_jax.data.templates import join_turns, render, split_turns, steerlm_generation_prompt, steerlm_text
from hs2p_jax.errors import UserError
from hs2p_jax.tokenizer import load_tokenizer

MULTI = "Hi.\n<extra_id_1>Assistant\nHello! How can I help?\n<extra_id_1>User\nWhat is 2+2?"


def test_steerlm_text_byte_for_byte():
  want = ("<extra_id_0>System\nA chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.\n<extra_id_1>User\nWhat is 2+2?\n"
          "<extra_id_1>Assistant\n4\n<extra_id_2>")
  assert steerlm_text("What is 2+2?", "4").encode() == want.encode()
  gen = steerlm_generation_prompt("What is 2+2?")
  assert want.startswith(gen) and gen.endswith("<extra_id_1>Assistant\n") and want[len(gen):] == "4\n<extra_id_2>"
  assert render("steerlm", "What is 2+2?", "4").text == want
  assert render("steerlm", "What is 2+2?").text == gen


def test_multi_turn_prompt_markers_stay_inside_the_user_turn():
  text = steerlm_text(MULTI, "4.")
  assert text.count("<extra_id_1>User\n") == 2 and text.count("<extra_id_1>Assistant\n") == 2
  assert "\n<extra_id_1>User\nHi.\n<extra_id_1>Assistant\nHello! How can I help?\n<extra_id_1>User\nWhat is 2+2?\n" \
         "<extra_id_1>Assistant\n4.\n<extra_id_2>" in text


def test_split_and_join_turns_round_trip():
  turns = split_turns(MULTI)
  assert turns == [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "What is 2+2?"}]
  assert join_turns(turns) == MULTI
  assert split_turns("single") == [{"role": "user", "content": "single"}]


def test_chat_template_pieces_with_chatml():
  tok = load_tokenizer("bytes")
  pieces = render("chat", MULTI, "4.", tok)
  want = ("<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
          "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4.<|im_end|>\n")
  assert pieces.text == want
  assert pieces.head == "<|im_start|>user\n" and pieces.response == "4." and pieces.tail == "<|im_end|>\n"
  assert pieces.prompt.startswith("Hi.") and pieces.prompt.endswith("What is 2+2?")
  gen = render("chat", MULTI, None, tok)
  assert gen.text == want[:want.rindex("4.")] and gen.response == gen.tail == ""


def test_chat_template_with_system_prompt_and_trimming():
  tok = copy.copy(load_tokenizer("bytes"))
  tok.chat_template = ("<|im_start|>system\nBe brief.<|im_end|>\n{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                       "{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
                       "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  pieces = render("chat", "  Hello  ", " Hi there ", tok)
  assert pieces.head == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
  assert (pieces.prompt, pieces.response, pieces.tail) == ("Hello", "Hi there", "<|im_end|>\n")
  tok.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
  with pytest.raises(UserError, match="rewrites message text"):
    render("chat", "hello", "hi", tok)


def test_unknown_template():
  with pytest.raises(UserError, match="data.template='llama'"):
    render("llama", "a", "b")
