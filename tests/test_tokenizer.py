"""Tokenizer and chat template against transformers on the same files."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.factories import make_tokenizer
from tpi.text.tokenizer import StreamDecoder, TextTokenizer

STRINGS = [
    "Hello world",
    " leading space",
    "What is the capital of France?",
    "naïve café 日本語 🙂",
    "  two  spaces\n\ttab",
    "<|im_start|>user\nhi<|im_end|>",
    "12345 3.14159",
    "",
]

LLAMA3_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('bad role ' + message['role']) }}{% endif %}"
    "{% if loop.index0 == 0 and message['role'] == 'system' %}{% set prefix = 'SYS' %}"
    "{% else %}{% set prefix = message['role'] | upper %}{% endif %}"
    "{{ '<|im_start|>' + prefix + '\n' }}{{ message['content'] | trim }}{{ '<|im_end|>' }}\n"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>ASSISTANT\n' }}{% endif %}"
    "{{ {'a': 'é'} | tojson }}"
)

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "  What is 2+2?  "},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And naïve 日本?"},
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    make_tokenizer(d)
    return d


def _hf(d):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d))


def test_encode_decode_match_transformers(tok_dir):
    ours, ref = TextTokenizer(tok_dir), _hf(tok_dir)
    for s in STRINGS:
        ids = ours.encode(s)
        assert ids == ref.encode(s), s
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("template", ["chatml", "llama3_style"])
def test_chat_template_matches_transformers(tok_dir, tmp_path, template):
    d = tok_dir
    if template == "llama3_style":
        d = tmp_path / "tpl"
        d.mkdir()
        (d / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
        cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
        cfg["chat_template"] = LLAMA3_STYLE_TEMPLATE
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours, ref = TextTokenizer(d), _hf(d)
    for msgs in (MESSAGES[1:2], MESSAGES):
        for gen in (True, False):
            expected = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert ours.render_chat(msgs, gen) == expected
            ids = ref.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            assert ours.encode_chat(msgs, gen) == list(ids)


def test_template_exception_is_a_clear_error(tok_dir, tmp_path):
    from tpi.text.chat_template import ChatTemplateError

    d = tmp_path / "tpl"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA3_STYLE_TEMPLATE}))
    with pytest.raises(ChatTemplateError, match="bad role tool"):
        TextTokenizer(d).render_chat([{"role": "tool", "content": "x"}])


def test_chat_template_from_separate_jinja_file(tok_dir, tmp_path):
    d = tmp_path / "j"
    d.mkdir()
    (d / "tokenizer.json").write_bytes((tok_dir / "tokenizer.json").read_bytes())
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    )
    assert TextTokenizer(d).render_chat([{"role": "user", "content": "hi"}]) == "[hi]"


def test_eos_ids_collected_from_all_sources(tok_dir, tmp_path):
    d = tmp_path / "e"
    d.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d / f).write_bytes((tok_dir / f).read_bytes())
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 5]}))
    (d / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    tok = TextTokenizer(d)
    assert tok.eos_ids == {0, 5, 7, tok.token_to_id("<|im_end|>")}


@settings(deadline=None, max_examples=60)
@given(text=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=60))
def test_stream_decoder_pieces_concatenate_to_full_decode(tok_dir, text):
    tok = TextTokenizer(tok_dir)
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids)
