"""The one prompt formatter (cscr.llm.prompt_ids) on real tokenizers, with and without a chat
template, and the context check serving uses."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from cscr.llm import PromptTooLong, fit_context, prompt_ids
from cscr.llm.prompt import context_length
from cscr.models import tiny_random_lm


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt")
    plain = AutoTokenizer.from_pretrained(tiny_random_lm(root / "plain", seed=0))
    chat = AutoTokenizer.from_pretrained(tiny_random_lm(root / "chat", seed=0, chat_template=True))
    return plain, chat


TEXT = "What is 17 + 25? Answer with a number."


def test_a_user_text_is_raw_without_a_template_and_one_user_turn_with_one(toks):
    plain, chat = toks
    assert prompt_ids(plain, TEXT) == plain.encode(TEXT, add_special_tokens=True)
    assert prompt_ids(chat, TEXT) == chat.encode(f"user: {TEXT}\nassistant:", add_special_tokens=False)
    # a conversation of one user message is the same prompt as its text, with or without a template
    for tok in toks:
        assert prompt_ids(tok, [{"role": "user", "content": TEXT}]) == prompt_ids(tok, TEXT)


def test_conversations_without_a_template_join_the_contents(toks):
    plain, chat = toks
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    assert prompt_ids(plain, convo) == plain.encode("Be brief.\n\nHi\n\nHello.\n\n2+2?", add_special_tokens=True)
    want = "system: Be brief.\nuser: Hi\nassistant: Hello.\nuser: 2+2?\nassistant:"
    assert prompt_ids(chat, convo) == chat.encode(want, add_special_tokens=False)


def test_completions_are_raw_even_with_a_template(toks):
    _, chat = toks
    assert prompt_ids(chat, "Once upon a time", completion=True) == chat.encode("Once upon a time")


def test_the_batch_cut_keeps_the_last_tokens_before_templating(toks):
    plain, chat = toks
    long = " ".join(f"word{i}" for i in range(200))
    raw = plain.encode(long, add_special_tokens=False)
    assert len(raw) > 50
    assert prompt_ids(plain, long, max_prompt_tokens=50) == plain.encode(plain.decode(raw[-50:]))
    tail = chat.decode(chat.encode(long, add_special_tokens=False)[-50:])
    assert prompt_ids(chat, long, max_prompt_tokens=50) == prompt_ids(chat, tail)
    assert prompt_ids(plain, TEXT, max_prompt_tokens=10_000) == prompt_ids(plain, TEXT)  # short: untouched
    with pytest.raises(ValueError, match="neither a raw completion nor cut"):
        prompt_ids(plain, [{"role": "user", "content": TEXT}], max_prompt_tokens=5)


def test_empty_prompts_and_the_context_check(toks):
    plain, _ = toks
    with pytest.raises(ValueError, match="empty"):
        prompt_ids(plain, [])
    assert fit_context(10, 64, None) == 64 and fit_context(10, 64, 1024) == 64 and fit_context(960, 64, 1024) == 64
    with pytest.raises(PromptTooLong, match="the prompt has 1024 tokens; the model's context is 1024"):
        fit_context(1024, 1, 1024)
    with pytest.raises(PromptTooLong, match="the prompt has 1024 tokens"):
        fit_context(1024, 1, 1024, shorten=True)  # no room at all: refused even for a default
    # the client's max_tokens is never capped; a server default is shortened to the room left
    with pytest.raises(PromptTooLong, match=r"maximum context length is 1024 tokens\. However, you requested "
                                            r"1064 tokens \(1000 in the prompt, 64 in the completion\)") as err:
        fit_context(1000, 64, 1024)
    assert (err.value.prompt_tokens, err.value.max_tokens, err.value.context) == (1000, 64, 1024)
    assert "1000 in the messages" in err.value.describe("messages")
    assert fit_context(1000, 64, 1024, shorten=True) == 24


def test_context_length_from_the_model_config(tmp_path):
    from transformers import AutoConfig

    folder = tiny_random_lm(tmp_path / "lm", seed=0)
    assert context_length(AutoConfig.from_pretrained(folder)) == 1024
