"""BOS and prompt pre-flight for lm-eval runs on Gemma: every request is checked before anything is scored.

Gemma scores collapse without a BOS token (lm-eval #1465: gemma-7b lambada perplexity 5.9e9 without it) and a
chat template applied on top of ``add_bos`` doubles it (lm-eval #2049, #3430: ``[2, 2, 105, ...]``). This module

* checks token-id requests exactly as they will be fed (:func:`check_bos`): one BOS, first, and nowhere else;
* renders Gemma chat prompts itself (:func:`render_chat`), per generation, so a run never depends on whichever
  template a checkpoint happens to ship;
* renders a tokenizer's own Jinja chat template the way HF ``apply_chat_template`` does and compares it with the
  harness's rendering token for token (:func:`compare_with_template`, :func:`check_template`).

Every failure is a one-line :class:`PreflightError` (a ``ValueError``) naming the request or the token position.

Chat formats (see :func:`render_chat` for the per-generation rules and their sources):

* Gemma 1-3: ``<bos><start_of_turn>user\\n{content}<end_of_turn>\\n<start_of_turn>model\\n``, content trimmed,
  ``assistant`` rendered as ``model``, roles alternating user/model. Gemma 3 prepends a system message to the first
  user turn followed by ``"\\n\\n"``; Gemma 1/2 templates reject a system role, and so does the harness.
* Gemma 4: ``<|turn>{role}\\n{content}<turn|>\\n`` with a native system turn, a ``<|think|>`` switch and
  ``<|tool>`` / ``<|tool_call>`` / ``<|tool_response>`` syntax, pinned to the launch revision of Google's template.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "BOS_TEXT",
    "GEMMA4_SOURCES",
    "PreflightError",
    "TemplateCheck",
    "bos_problem",
    "check_bos",
    "check_template",
    "compare_texts",
    "compare_with_template",
    "first_ids",
    "read_gguf_chat_metadata",
    "render_chat",
    "render_template",
]

BOS_TEXT = "<bos>"
_SHOW_REQUESTS = 3  # offending requests named in a PreflightError
_CONTEXT = 4  # ids shown either side of the first differing token


class PreflightError(ValueError):
    """A request or prompt would be scored wrongly; the message is one line naming what and where."""


# --------------------------------------------------------------------------------------------------------------
# BOS
# --------------------------------------------------------------------------------------------------------------
def first_ids(ids: Sequence[int] | Iterable[int], k: int = 8) -> list[int]:
    """The first ``k`` ids of a request as plain ints (lists, tuples, numpy arrays and 1-d tensors alike)."""
    out: list[int] = []
    for i, tok in enumerate(ids):
        if i >= k:
            break
        out.append(int(tok))
    return out


def bos_problem(ids: Sequence[int], bos_id: int) -> str | None:
    """What is wrong with the BOS of one request, or ``None``: exactly one BOS, at position 0.

    ``"no BOS"`` (first id is not BOS), ``"BOS doubled"`` (positions 0 and 1), ``"BOS at position 17"`` (a BOS
    anywhere after the start); problems are joined with ``", "`` (``"no BOS, BOS at position 17"``).
    """
    seq = [int(t) for t in ids]
    if not seq:
        return "empty request (no BOS)"
    problems = []
    if seq[0] != bos_id:
        problems.append("no BOS")
    later = [i for i in range(1, len(seq)) if seq[i] == bos_id]
    if seq[0] == bos_id and later and later[0] == 1:
        problems.append("BOS doubled")
        later = later[1:]
    if later:
        where = ", ".join(str(i) for i in later[:3]) + (
            f" (+{len(later) - 3} more)" if len(later) > 3 else ""
        )
        problems.append(f"BOS at position{'s' if len(later) > 1 else ''} {where}")
    return ", ".join(problems) or None


def check_bos(requests: Sequence[Sequence[int]], bos_id: int, labels: Sequence[str] | None = None) -> None:
    """Raise :class:`PreflightError` unless every request starts with exactly one BOS and has none elsewhere.

    ``requests`` are token-id sequences exactly as they will be fed to the model (context + continuation).
    The error names the first (up to 3) offending requests by label (or index) with their first 8 ids and the
    problem, e.g. ``2 of 500 requests fail the BOS check (bos_id 2): 'lambada/3' [no BOS] first ids [651, ...]``.
    """
    if labels is not None and len(labels) != len(requests):
        raise ValueError(f"check_bos: {len(labels)} labels for {len(requests)} requests")
    bad = []
    for i, ids in enumerate(requests):
        problem = bos_problem(ids, bos_id)
        if problem is not None:
            bad.append((i, problem))
    if not bad:
        return
    shown = "; ".join(
        f"{_label(labels, i)} [{problem}] first ids {first_ids(requests[i])}"
        for i, problem in bad[:_SHOW_REQUESTS]
    )
    more = f"; +{len(bad) - _SHOW_REQUESTS} more" if len(bad) > _SHOW_REQUESTS else ""
    raise PreflightError(
        f"{len(bad)} of {len(requests)} requests fail the BOS check (bos_id {bos_id}): {shown}{more}"
    )


def _label(labels: Sequence[str] | None, i: int) -> str:
    return repr(str(labels[i])) if labels is not None else f"request #{i}"


# --------------------------------------------------------------------------------------------------------------
# Chat rendering by the harness
# --------------------------------------------------------------------------------------------------------------
def render_chat(
    messages: list[dict],
    generation: int,
    add_generation_prompt: bool = True,
    enable_thinking: bool = False,
    tools: list[dict] | None = None,
) -> str:
    """The chat prompt the harness feeds a Gemma model of ``generation`` 1-4, as text starting with ``<bos>``.

    Tokenize it with special tokens matched whole and *without* adding another BOS, then :func:`check_bos`.
    Content must be a string (``None`` counts as empty); structured (list) content raises NotImplementedError.

    Gemma 1-3 (Google's ``google/gemma-{7b,2-*,3-*}-it`` chat templates as HF ``apply_chat_template`` renders
    them; Gemma 3's checked token for token with the real tokenizer against Google's template, which
    ``tests/test_lmeval_preflight.py`` takes from the GGUF or ``$GEMMA_HARNESS_GEMMA3_CHAT_TEMPLATE``, and against
    llama.cpp's built-in ``gemma`` format, which strips the system text where Google's template does not):
    ``<bos>``, then per message ``<start_of_turn>{user|model}\\n{content.strip()}<end_of_turn>\\n``, then
    ``<start_of_turn>model\\n`` if ``add_generation_prompt``. Roles must alternate user/assistant starting with
    user (the templates raise otherwise). A leading system message: Gemma 3 prepends its content (not stripped)
    plus ``"\\n\\n"`` to the first turn; Gemma 1/2 templates reject it. No thinking switch and no tool syntax:
    ``enable_thinking``/``tools`` raise ValueError.

    Gemma 4: see :func:`_render_gemma4` (sources in :data:`GEMMA4_SOURCES`).
    """
    if not messages:
        raise ValueError("render_chat: no messages")
    for m in messages:
        _check_message(m)
    if generation in (1, 2, 3):
        if enable_thinking:
            raise ValueError(f"enable_thinking: Gemma {generation} has no thinking switch (Gemma 4 only)")
        if tools:
            raise ValueError(f"tools: Gemma {generation} chat templates have no tool syntax (Gemma 4 only)")
        return _render_gemma_1_3(messages, generation, add_generation_prompt)
    if generation == 4:
        return _render_gemma4(messages, add_generation_prompt, enable_thinking, tools)
    raise ValueError(f"render_chat: unknown Gemma generation {generation!r} (1-4)")


def _check_message(message: Any) -> None:
    if not isinstance(message, Mapping) or "role" not in message:
        raise ValueError(f"chat message must be a dict with a 'role': {message!r}")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise NotImplementedError(
            f"structured (list) content is not rendered by the harness (role {message['role']!r}); pass a string"
        )


def _content(message: Mapping[str, Any]) -> str:
    return message.get("content") or ""


def _render_gemma_1_3(messages: list[dict], generation: int, add_generation_prompt: bool) -> str:
    """Gemma 1-3: ``<start_of_turn>`` / ``<end_of_turn>`` turns; system folded into the first turn (Gemma 3)."""
    prefix, loop = "", messages
    if messages[0]["role"] == "system":
        if generation < 3:
            raise PreflightError("system role not supported by Gemma 1/2 (their chat templates raise on it)")
        prefix, loop = _content(messages[0]) + "\n\n", messages[1:]
    parts = [BOS_TEXT]
    for i, message in enumerate(loop):
        role = _gemma_1_3_role(message["role"], i, generation)
        parts.append(
            f"<start_of_turn>{role}\n{prefix if i == 0 else ''}{_content(message).strip()}<end_of_turn>\n"
        )
    if add_generation_prompt:
        parts.append("<start_of_turn>model\n")
    return "".join(parts)


def _gemma_1_3_role(role: str, index: int, generation: int) -> str:
    """``user`` on even turns, ``assistant``/``model`` on odd ones, as the templates' alternation check demands."""
    if role == "system":
        if generation < 3:
            raise PreflightError("system role not supported by Gemma 1/2 (their chat templates raise on it)")
        raise PreflightError(f"system message at turn {index}: Gemma 3 takes one, first")
    if role not in ("user", "assistant", "model"):
        raise PreflightError(
            f"role {role!r} at turn {index}: Gemma {generation} knows user and assistant/model"
        )
    if (role == "user") != (index % 2 == 0):
        raise PreflightError(
            f"Conversation roles must alternate user/assistant/user/assistant/... (turn {index} is {role!r})"
        )
    return "user" if role == "user" else "model"


# Gemma 4 ---------------------------------------------------------------------------------------------------------
GEMMA4_SOURCES = (
    "https://ai.google.dev/gemma/docs/core/prompt-formatting-gemma4 (control tokens; system and thinking examples)",
    "ggml-org/llama.cpp:models/templates/gemma4.jinja @ a20c1a89cfb3ebc911d91245af15cbe89751eaaf "
    "(Google's google/gemma-4-*-it chat_template.jinja at release, vendored by llama.cpp)",
)
_Q = '<|"|>'  # Gemma 4's string delimiter token
_STANDARD_KEYS = ("description", "type", "properties", "required", "nullable")


def _render_gemma4(
    messages: list[dict], add_generation_prompt: bool, enable_thinking: bool, tools: list[dict] | None
) -> str:
    """Gemma 4, pinned to the launch revision of Google's template (:data:`GEMMA4_SOURCES`).

    * ``<bos>``; a system turn ``<|turn>system\\n[<|think|>]{system.strip()}{tool declarations}<turn|>\\n`` when
      thinking is on, tools are given or the first message is ``system``/``developer`` (the docs' examples:
      ``<|turn>system\\nYou are a helpful assistant.<turn|>\\n``, ``<|turn>system\\n<|think|><turn|>\\n``).
    * Each message ``<|turn>{role}\\n...<turn|>\\n``, ``assistant`` -> ``model``; user content stripped, model content
      with ``<|channel>...<channel|>`` thoughts removed, then stripped. An assistant message may carry
      ``tool_calls`` (``<|tool_call>call:NAME{k:v,...}<tool_call|>``) and ``tool_responses``
      (``<|tool_response>response:NAME{k:v,...}<tool_response|>``; no ``<turn|>`` when it has no content).
    * Generation prompt ``<|turn>model\\n`` (left out right after a tool response), followed by the empty thought
      ``<|channel>thought\\n<channel|>`` when thinking is off.

    Not established, so NotImplementedError: OpenAI-style ``role: "tool"`` messages (the launch template renders
    them as a bare ``<|turn>tool`` turn, later revisions fold them into ``<|tool_response>``); tool parameters of
    type OBJECT/ARRAY or a list of types and ``response`` declarations (formatted differently by the template
    revisions). Later revisions of the Google template (reported, not verified here against a primary copy) put
    ``\\n`` after ``<|think|>`` and drop the empty thought block for E2B/E4B: check a checkpoint's own template
    with :func:`check_template`.
    """
    first = messages[0]["role"]
    loop = messages[1:] if first in ("system", "developer") else messages
    parts = [BOS_TEXT]
    if enable_thinking or tools or first in ("system", "developer"):
        system = _content(messages[0]).strip() if first in ("system", "developer") else ""
        declarations = "".join(f"<|tool>{_tool_declaration(t)}<tool|>" for t in tools or [])
        parts.append(
            f"<|turn>system\n{'<|think|>' if enable_thinking else ''}{system}{declarations}<turn|>\n"
        )
    for message in loop:
        parts.append(_gemma4_turn(message))
    if add_generation_prompt:
        if not (loop and loop[-1].get("tool_responses")):
            parts.append("<|turn>model\n")
        if not enable_thinking:
            parts.append("<|channel>thought\n<channel|>")
    return "".join(parts)


def _gemma4_turn(message: Mapping[str, Any]) -> str:
    """One Gemma 4 message: turn header, tool calls, tool responses, content, turn end."""
    role = message["role"]
    if role == "tool":
        raise NotImplementedError(
            "Gemma 4 role 'tool' messages: not established (the launch template renders a bare '<|turn>tool' turn, "
            "later revisions fold them into <|tool_response>); put tool_responses on the assistant message"
        )
    if role not in ("user", "assistant", "model", "system"):
        raise ValueError(f"Gemma 4 role {role!r}: expected user, assistant/model or system")
    role = "model" if role == "assistant" else role
    parts = [f"<|turn>{role}\n"]
    for call in message.get("tool_calls") or []:
        parts.append(_tool_call(call))
    for response in message.get("tool_responses") or []:
        parts.append(_tool_response(response))
    content = _content(message)
    parts.append(_strip_thinking(content) if role == "model" else content.strip())
    if not (message.get("tool_responses") and not content):
        parts.append("<turn|>\n")
    return "".join(parts)


def _strip_thinking(text: str) -> str:
    """Model content without its ``<|channel>...<channel|>`` thoughts, stripped (the template's ``strip_thinking``)."""
    kept = [part.split("<|channel>")[0] for part in text.split("<channel|>")]
    return "".join(kept).strip()


def _dictsort(mapping: Mapping[Any, Any]) -> list[tuple[Any, Any]]:
    """Jinja's ``dictsort``: items by key, case-insensitively, stable."""
    return sorted(mapping.items(), key=lambda kv: kv[0].lower() if isinstance(kv[0], str) else kv[0])


def _format_argument(value: Any, escape_keys: bool = True) -> str:
    """A value in Gemma 4's tool syntax: strings in ``<|"|>``, booleans ``true``/``false``, ``{k:v}``, ``[a,b]``."""
    if isinstance(value, str):
        return f"{_Q}{value}{_Q}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        items = (
            (f"{_Q}{k}{_Q}" if escape_keys else str(k)) + ":" + _format_argument(v, escape_keys)
            for k, v in _dictsort(value)
        )
        return "{" + ",".join(items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_format_argument(v, escape_keys) for v in value) + "]"
    return str(value)  # numbers; None renders as "None", as Jinja prints it


def _tool_call(call: Mapping[str, Any]) -> str:
    """``<|tool_call>call:NAME{k:v,...}<tool_call|>``; string arguments are inserted verbatim, as the template does."""
    function = call["function"]
    args = function.get("arguments")
    if isinstance(args, Mapping):
        body = ",".join(f"{k}:{_format_argument(v, escape_keys=False)}" for k, v in _dictsort(args))
    elif isinstance(args, str):
        body = args
    else:
        body = ""
    return f"<|tool_call>call:{function['name']}{{{body}}}<tool_call|>"


def _tool_response(response: Mapping[str, Any]) -> str:
    """``<|tool_response>response:NAME{k:v,...}<tool_response|>``; a non-mapping response becomes ``{value:...}``."""
    name = response.get("name", "unknown")
    value = response.get("response")
    if isinstance(value, Mapping):
        body = ",".join(f"{k}:{_format_argument(v, escape_keys=False)}" for k, v in _dictsort(value))
    else:
        body = "value:" + _format_argument(value, escape_keys=False)
    return f"<|tool_response>response:{name}{{{body}}}<tool_response|>"


def _tool_declaration(tool: Mapping[str, Any]) -> str:
    """``declaration:NAME{description:<|"|>...<|"|>,parameters:{properties:{...},required:[...],type:...}}``."""
    if not isinstance(tool, Mapping) or not isinstance(tool.get("function"), Mapping):
        raise ValueError(f"tool must be {{'type': 'function', 'function': {{...}}}}: {tool!r}")
    function = tool["function"]
    if "response" in function:
        raise NotImplementedError("Gemma 4 tool 'response' declarations: not rendered by the harness")
    out = f"declaration:{function['name']}{{description:{_Q}{function.get('description', '')}{_Q}"
    params = function.get("parameters")
    if params:
        out += ",parameters:{"
        if params.get("properties"):
            out += "properties:{" + _format_properties(params["properties"]) + "},"
        if params.get("required"):
            out += "required:[" + ",".join(f"{_Q}{r}{_Q}" for r in params["required"]) + "],"
        if params.get("type"):
            out += f"type:{_Q}{_scalar_type(params['type'], 'parameters')}{_Q}}}"
    return (out + "}").strip()


def _scalar_type(typ: Any, where: str) -> str:
    if not isinstance(typ, str):
        raise NotImplementedError(
            f"Gemma 4 tool {where}: a list of types is formatted differently by the revisions"
        )
    return typ.upper()


def _format_properties(properties: Mapping[str, Any]) -> str:
    """The template's ``format_parameters`` for scalar properties: ``key:{description,nullable,enum,type}``."""
    out = []
    for key, value in _dictsort(properties):
        if key in _STANDARD_KEYS:
            continue  # the template skips properties named like schema keywords
        typ = _scalar_type(value["type"], f"parameter {key!r}") if "type" in value else ""
        if typ in ("OBJECT", "ARRAY"):
            raise NotImplementedError(
                f"Gemma 4 tool parameter {key!r} of type {typ}: not rendered by the harness"
            )
        fields = []
        if value.get("description"):
            fields.append(f"description:{_Q}{value['description']}{_Q}")
        if value.get("nullable"):
            fields.append("nullable:true")
        if typ == "STRING" and value.get("enum"):
            fields.append("enum:" + _format_argument(value["enum"]))
        fields.append(f"type:{_Q}{typ}{_Q}")
        out.append(f"{key}:{{{','.join(fields)}}}")
    return ",".join(out)


# --------------------------------------------------------------------------------------------------------------
# The tokenizer's own template vs the harness
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TemplateCheck:
    """Token-by-token comparison of the harness's rendering with a chat template's.

    ``position`` is the first index where the id lists differ (``None`` when ``ok``; the shorter length when one
    is a prefix of the other); ``harness_window``/``template_window`` are the ids from ``window_start`` to a few
    past ``position``.
    """

    ok: bool
    position: int | None
    harness_ids: list[int]
    template_ids: list[int]
    window_start: int
    harness_window: list[int]
    template_window: list[int]
    harness_text: str
    template_text: str

    def message(self) -> str:
        """One line: where the renderings differ, the two ids there and the ids around them."""
        if self.ok:
            return f"chat template matches the harness ({len(self.harness_ids)} tokens)"
        pos, char = self.position, _first_diff(self.harness_text, self.template_text)
        h = self.harness_ids[pos] if pos < len(self.harness_ids) else "end"
        t = self.template_ids[pos] if pos < len(self.template_ids) else "end"
        return (
            f"chat template differs at token {pos}: harness {h} vs template {t} "
            f"(ids[{self.window_start}:{pos + _CONTEXT + 1}] harness {self.harness_window} vs template "
            f"{self.template_window}; text at char {char}: harness {_around(self.harness_text, char)} "
            f"vs template {_around(self.template_text, char)})"
        )


def _first_diff(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _around(text: str, i: int, width: int = 12) -> str:
    return repr(text[max(0, i - width) : i + width])


def compare_texts(
    harness_text: str, template_text: str, tokenize: Callable[[str], list[int]]
) -> TemplateCheck:
    """Tokenize both renderings with ``tokenize`` (special tokens matched whole, no BOS added) and compare ids."""
    h = [int(t) for t in tokenize(harness_text)]
    t = [int(x) for x in tokenize(template_text)]
    pos = next((i for i, (a, b) in enumerate(zip(h, t, strict=False)) if a != b), None)
    if pos is None and len(h) != len(t):
        pos = min(len(h), len(t))
    start = max(0, (pos or 0) - _CONTEXT)
    end = (pos or 0) + _CONTEXT + 1
    return TemplateCheck(
        ok=pos is None,
        position=pos,
        harness_ids=h,
        template_ids=t,
        window_start=start,
        harness_window=h[start:end],
        template_window=t[start:end],
        harness_text=harness_text,
        template_text=template_text,
    )


def _template_env() -> Any:
    """A Jinja environment like HF's ``_compile_jinja_template``: immutable sandbox, ``trim_blocks`` and
    ``lstrip_blocks``, ``loopcontrols``, a no-op ``{% generation %}`` tag, the ``tojson`` filter without HTML
    escaping and the globals ``raise_exception`` and ``strftime_now``."""
    import json
    from datetime import datetime

    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):  # HF's AssistantTracker tag, rendered transparently
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Callable[[], str]) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys=False
    ):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def render_template(
    template: str,
    messages: list[dict],
    bos_token: str = BOS_TEXT,
    eos_token: str = "<eos>",
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
    **template_kwargs: Any,
) -> str:
    """Render a tokenizer's Jinja chat template as HF ``apply_chat_template(..., tokenize=False)`` does: variables
    ``messages``, ``tools``, ``documents`` (None), ``add_generation_prompt``, ``bos_token``, ``eos_token`` and any
    extra ``template_kwargs`` (``enable_thinking=...``). A template's ``raise_exception`` raises
    ``jinja2.exceptions.TemplateError``."""
    compiled = _template_env().from_string(template)
    return compiled.render(
        messages=messages,
        tools=tools,
        documents=None,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
        **template_kwargs,
    )


def compare_with_template(
    messages: list[dict],
    generation: int,
    template: str,
    tokenize: Callable[[str], list[int]],
    bos_token: str = BOS_TEXT,
    **kw: Any,
) -> TemplateCheck:
    """Render ``messages`` with the tokenizer's own ``template`` and with :func:`render_chat`, tokenize both with
    ``tokenize`` (which must match special tokens whole and add no BOS) and compare token by token.

    ``kw`` (``add_generation_prompt``, ``enable_thinking``, ``tools``) goes to both renderings; ``enable_thinking``
    reaches the template only when given, as with HF. The harness's text starts with ``<bos>``; ``bos_token`` is
    the text the template gets for it.
    """
    harness_text = render_chat(messages, generation, **kw)
    template_text = render_template(template, messages, bos_token=bos_token, **kw)
    return compare_texts(harness_text, template_text, tokenize)


def check_template(
    messages: list[dict],
    generation: int,
    template: str,
    tokenize: Callable[[str], list[int]],
    bos_token: str = BOS_TEXT,
    **kw: Any,
) -> TemplateCheck:
    """:func:`compare_with_template`, raising :class:`PreflightError` (``"chat template differs at token 5:
    harness 106 vs template 2 ..."``) on a mismatch; returns the check when the renderings agree."""
    check = compare_with_template(messages, generation, template, tokenize, bos_token=bos_token, **kw)
    if not check.ok:
        raise PreflightError(check.message())
    return check


# --------------------------------------------------------------------------------------------------------------
# GGUF metadata (no tensors read)
# --------------------------------------------------------------------------------------------------------------
def read_gguf_chat_metadata(path: str | os.PathLike) -> tuple[str | None, dict[str, Any]]:
    """``(chat_template, tokens_meta)`` of a GGUF without dequantizing any tensor.

    ``chat_template`` is ``tokenizer.chat_template`` or ``None`` when the file carries none (the packaged Gemma 3
    270M Q4_K_M file does not); ``tokens_meta`` is what :func:`reference_impl.gguf_loader.encode` takes (the same
    dict :func:`~reference_impl.gguf_loader.read_gguf` returns, less the tensor facts).
    """
    from gguf import GGUFReader

    from reference_impl import gguf_loader

    meta = gguf_loader._read_metadata(GGUFReader(str(path)))
    template = meta.get("tokenizer.chat_template")
    return (str(template) if template is not None else None), gguf_loader._tokens_meta(meta)
