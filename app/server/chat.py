"""An OpenAI chat completion request, read into what `RepoMemory.ask` takes.

The last user message is the question (it is also what retrieval searches with); earlier user and
assistant messages become the history; system (and `developer`) messages are the client's own
instructions. Unknown fields are ignored, as OpenAI-compatible servers do; values of the wrong type
are refused with the name of the field. repomem's own options live under `"repomem"` in the body.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from repomem.core import SamplingParams, Settings

from .errors import APIError

MAX_STOPS = 4


@dataclass
class ChatRequest:
    model: str
    question: str
    history: list[tuple[str, str]] = field(default_factory=list)
    system: str = ""
    stream: bool = False
    include_usage: bool = False
    sampling: SamplingParams = field(default_factory=SamplingParams)
    sources_footer: bool = True
    user: str = ""  # the client's own name for whoever asks: the fair queue's line (`clients.py`)


def parse_chat(body: Any, settings: Settings) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise APIError(400, "`model` is required (e.g. \"repomem\")", param="model")
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise APIError(400, "only n=1 is supported: one model answers one request at a time", param="n",
                       code="unsupported_value")
    question, history, system = _messages(body.get("messages"))
    options = body.get("repomem") or {}
    if not isinstance(options, dict):
        raise APIError(400, "`repomem` must be an object of repomem options", param="repomem")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise APIError(400, "`stream_options` must be an object", param="stream_options")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise APIError(400, "`user` must be a string", param="user")
    if _forces_a_tool(body.get("tool_choice")):
        raise APIError(400, "repomem answers in text and cannot call tools: leave `tool_choice` as \"auto\" or "
                       "\"none\"", param="tool_choice", code="unsupported_value")
    if _demands_a_schema(body):
        raise APIError(400, "repomem cannot bind its reply to a JSON schema: send `strict: false` or "
                       "`response_format` {\"type\": \"json_object\"}", param="response_format",
                       code="unsupported_value")
    tokens_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    sampling = SamplingParams(
        temperature=_number(body, "temperature", settings.temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", 0.95, 0.0, 1.0),
        seed=_int(body, "seed", None),
        max_tokens=_int(body, tokens_key, settings.max_answer_tokens, low=1),
        stop=_stops(body.get("stop")),
    )
    return ChatRequest(model=model.strip(), question=question, history=history, system=system,
                       stream=_bool(body, "stream", False), include_usage=_bool(stream_options, "include_usage", False),
                       sampling=sampling,
                       # a reply the client parses as JSON must be nothing else
                       sources_footer=_bool(options, "sources_footer", True) and not _wants_json(body),
                       user=(user or "").strip())


def _forces_a_tool(choice: Any) -> bool:
    """`tool_choice` "required" or a named function: the reply must be a tool call, which repomem never makes."""
    return choice == "required" or isinstance(choice, dict)


def _demands_a_schema(body: dict) -> bool:
    """A `json_schema` format with `strict: true`: the client relies on every reply matching the schema,
    which only constrained decoding can promise (repomem decodes freely, as for `json_object`)."""
    fmt = body.get("response_format")
    schema = fmt.get("json_schema") if isinstance(fmt, dict) and fmt.get("type") == "json_schema" else None
    return isinstance(schema, dict) and schema.get("strict") is True


def _wants_json(body: dict) -> bool:
    fmt = body.get("response_format")
    return isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")


def _messages(messages: Any) -> tuple[str, list[tuple[str, str]], str]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "`messages` must be a non-empty list", param="messages")
    system: list[str] = []
    turns: list[list[str]] = []  # [role, text], consecutive messages of one role merged
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] needs a `role`", param=f"messages[{i}]")
        role, text = m["role"], _content(m.get("content"), i)
        if role in ("system", "developer"):
            if text.strip():
                system.append(text.strip())
            continue
        if role in ("tool", "function"):  # a tool's result reads as the user's turn
            role, text = "user", f"Tool result:\n{text}"
        if role not in ("user", "assistant"):
            raise APIError(400, f"messages[{i}] has the unknown role {role!r}", param=f"messages[{i}].role")
        if turns and turns[-1][0] == role:
            turns[-1][1] += "\n\n" + text
        else:
            turns.append([role, text])
    if not turns or turns[-1][0] != "user" or not turns[-1][1].strip():
        raise APIError(400, "the last message must be the user's question", param="messages")
    if turns[0][0] == "assistant":
        turns.insert(0, ["user", ""])
    history = [(turns[j][1], turns[j + 1][1]) for j in range(0, len(turns) - 1, 2)]
    return turns[-1][1].strip(), history, "\n\n".join(system)


def _content(content: Any, i: int) -> str:
    """A message's text: a string, or the text parts of a list of content parts (images are ignored)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "\n".join(parts)
    raise APIError(400, f"messages[{i}].content must be a string or a list of content parts",
                   param=f"messages[{i}].content")


def _number(body: dict, key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise APIError(400, f"`{key}` must be a number from {low:g} to {high:g}", param=key)
    return float(value)


def _int(body: dict, key: str, default: int | None, low: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        raise APIError(400, f"`{key}` must be an integer" + (f" of at least {low}" if low is not None else ""),
                       param=key)
    return value


def _bool(body: dict, key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"`{key}` must be true or false", param=key)
    return value


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise APIError(400, f"`stop` must be a string or a list of up to {MAX_STOPS} strings", param="stop")
    return tuple(s for s in stops if s)
