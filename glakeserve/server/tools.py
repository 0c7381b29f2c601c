"""Tool calling on /v1/chat/completions: OpenAI's tools, tool_choice and parallel_tool_calls.

The tools go to the model through its chat template (only a template that renders them is
accepted). What comes back depends on tool_choice:
- "none": the tools are in the prompt, the reply is plain content;
- "auto": free generation, then the text is read as tool calls in the template's format: Hermes/Qwen
  (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call) or Llama 3.1's
  JSON (`{"name": ..., "parameters": {...}}`, several joined by `;`). Text that is not a call to one
  of the request's tools is plain content;
- "required" or a named function: the output is forced by a JSON schema (structured output), as
  vLLM does: a named function's arguments object, or for "required" a call object
  `{"name", "parameters"}` (a list of them when parallel_tool_calls is true)."""

from __future__ import annotations

import json
import re
import uuid
import warnings
from dataclasses import dataclass

from glakeserve.server.protocol import ApiError, check_text, short
from glakeserve.structured import GuidedDecoding

try:  # the meta-schema check of tool parameters (requirements.txt); without it the shape check alone runs
    from jsonschema import Draft202012Validator, FormatChecker, ValidationError
    from jsonschema.validators import validator_for
except ImportError:
    Draft202012Validator = None

TOOL_FORMATS = ("hermes", "llama3_json")
CHOICES = ("none", "auto", "required")
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
SCHEMA_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
NO_PARAMETERS = {"type": "object", "properties": {}}
HERMES_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict

    def openai(self) -> dict:
        """OpenAI's shape, arguments as JSON text, with a fresh id."""
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


@dataclass(frozen=True)
class ToolRequest:
    """A request's tools (as the chat template takes them), its choice ("none", "auto", "required"
    or "function" with `name`) and whether several calls may come in one reply."""

    tools: tuple[dict, ...]
    choice: str
    name: str | None
    parallel: bool

    @property
    def schemas(self) -> dict[str, dict]:
        return {t["function"]["name"]: t["function"].get("parameters", NO_PARAMETERS) for t in self.tools}

    def forced(self) -> GuidedDecoding | None:
        """The constraint that makes the output a call (tool_choice "required" or named)."""
        if self.choice == "function":
            return GuidedDecoding.json_schema(self.schemas[self.name])
        if self.choice != "required":
            return None
        call = {"anyOf": [{"type": "object", "properties": {"name": {"type": "string", "enum": [name]},
                                                            "parameters": schema},
                           "required": ["name", "parameters"]} for name, schema in self.schemas.items()]}
        return GuidedDecoding.json_schema({"type": "array", "minItems": 1, "items": call} if self.parallel else call)

    def parse(self, text: str, fmt: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a reply; no calls means the whole text is content."""
        if self.choice == "none":
            return text, []
        if self.choice in ("function", "required"):
            found = self._forced_calls(text)
        else:
            found = parse_tool_calls(text, fmt, self.schemas.keys())
        if found is None or not found[1]:
            return text, []
        content, calls = found
        return content, calls if self.parallel else calls[:1]  # parallel_tool_calls false: the first call only

    def _forced_calls(self, text: str) -> tuple[None, list[ToolCall]] | None:
        try:  # a reply cut short (max_tokens, a stop string) is not JSON: it stays content
            value = json.loads(text)
        except ValueError:
            return None
        if self.choice == "function":
            return (None, [ToolCall(self.name, value)]) if isinstance(value, dict) else None
        calls = [_call(v, self.schemas.keys()) for v in (value if isinstance(value, list) else [value])]
        return None if None in calls else (None, calls)


def _call(value, names) -> ToolCall | None:
    """{"name": ..., "parameters" or "arguments": {...}} naming one of the tools, else None."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or value["name"] not in names:
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return ToolCall(value["name"], args) if isinstance(args, dict) else None


def parse_tool_calls(text: str, fmt: str, names) -> tuple[str | None, list[ToolCall]] | None:
    """The calls in a freely generated reply, and its content (None when there is none): Hermes, the
    text around the call blocks; Llama 3.1, none. None when the text holds no calls, or (Llama 3.1: is
    not entirely) calls to the named tools."""
    if fmt == "hermes":
        return _hermes_calls(text, names)
    if fmt != "llama3_json":
        raise ValueError(f"unknown tool-call format {fmt!r}; expected one of {', '.join(TOOL_FORMATS)}")
    rest = text.strip().removeprefix(PYTHON_TAG).lstrip()
    if not rest.startswith("{"):
        return None
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while pos < len(rest):
        try:
            value, pos = decoder.raw_decode(rest, pos)
        except ValueError:
            return None
        calls.append(_call(value, names))
        pos = len(rest) - len(rest[pos:].lstrip().removeprefix(";").lstrip())  # `; ` between calls
    return None if None in calls else (None, calls)


def _hermes_calls(text: str, names) -> tuple[str | None, list[ToolCall]] | None:
    """Each <tool_call> block a call; the text before, between and after them is the content, with
    the space next to the blocks trimmed where the content starts and ends (the text before the first
    may have streamed out already, so only its end is trimmed)."""
    start = text.find("<tool_call>")
    if start < 0:
        return None
    calls, outside, pos = [], [text[:start].rstrip()], start
    for block in HERMES_CALL.finditer(text, start):
        outside.append(text[pos:block.start()])
        try:
            calls.append(_call(json.loads(block.group(1)), names))
        except ValueError:
            return None
        pos = block.end()
    if not calls or None in calls:
        return None
    content = "".join(outside) + text[pos:]
    content = (content if outside[0] else content.lstrip()).rstrip()
    return content or None, calls


class ToolStream:
    """One streamed choice of a request whose reply is parsed: its text goes out as content while
    no call can have begun (Hermes: before `<tool_call>`; Llama 3.1: a reply that does not open with
    `{`); from where a call may begin it is held back, and read whole at the end (finish(): the calls,
    and the content after the first, such as Hermes text after the last block). A forced call
    (tool_choice required or named) is held back from the start."""

    def __init__(self, tools: ToolRequest, fmt: str):
        self.tools, self.fmt = tools, fmt
        self.text, self.sent = "", 0  # the reply so far; how many of its characters went out as content
        self.holding = tools.choice in ("function", "required")
        self.plain = False  # Llama 3.1: the reply is not a call

    def feed(self, delta: str) -> str:
        """The content that can go out now."""
        self.text += delta
        if self.holding:
            return ""
        if self.fmt == "hermes":
            start = self.text.find("<tool_call>", self.sent)
            if start >= 0:
                self.holding, end = True, start
            else:  # a tail that may be the tag's beginning, and trailing space (stripped before a call), wait
                end = len(self.text) - _tag_prefix(self.text, "<tool_call>")
            end = len(self.text[:end].rstrip())
        elif self.plain:
            end = len(self.text)
        else:
            head = self.text.lstrip()
            if head.startswith("{") or head.startswith(PYTHON_TAG):
                self.holding = True
                return ""
            if not head or PYTHON_TAG.startswith(head):
                return ""
            self.plain, end = True, len(self.text)
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The content not yet sent, and the calls (parse() of the whole reply)."""
        content, calls = self.tools.parse(self.text, self.fmt)
        if not calls:
            return self.text[self.sent:], []
        return (content or "")[self.sent:], calls


def _tag_prefix(text: str, tag: str) -> int:
    """The length of the longest end of text that is a beginning of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


# ----- the request's fields -----------------------------------------------------------------------
def tool_request(body: dict) -> ToolRequest | None:
    """tools, tool_choice and parallel_tool_calls checked (a 400 naming the field); None when the
    request has no tools."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice is not None and choice != "none":
            raise ApiError(400, f"tool_choice {short(choice)} needs tools; give tools or drop tool_choice",
                           param="tool_choice")
        return None
    if not isinstance(tools, list):
        raise ApiError(400, f"tools must be a list of {{\"type\": \"function\", \"function\": {{...}}}}, got "
                            f"{short(tools)}", param="tools")
    checked = [_tool(t, i) for i, t in enumerate(tools)]
    names = [t["function"]["name"] for t in checked]
    twice = {n for n in names if names.count(n) > 1}
    if twice:
        raise ApiError(400, f"tools: the function name {short(sorted(twice)[0])} is given more than once", param="tools")
    name = None
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        function = choice.get("function")
        if choice.get("type") != "function" or set(choice) != {"type", "function"} or not isinstance(function, dict) \
                or set(function) != {"name"} or not isinstance(function["name"], str):
            raise ApiError(400, f"tool_choice must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", "
                                f"\"function\": {{\"name\": ...}}}}, got {short(choice)}", param="tool_choice")
        name = function["name"]
        if name not in names:
            raise ApiError(400, f"tool_choice names the function {short(name)}, which is not among the tools "
                                f"({', '.join(names)})", param="tool_choice")
        choice = "function"
    elif choice not in CHOICES:
        raise ApiError(400, f"tool_choice must be \"none\", \"auto\", \"required\" or {{\"type\": \"function\", "
                            f"\"function\": {{\"name\": ...}}}}, got {short(choice)}", param="tool_choice")
    parallel = body.get("parallel_tool_calls")  # its type is checked with the other fields
    return ToolRequest(tuple(checked), choice, name, True if parallel is None else parallel)


def _tool(tool, i: int) -> dict:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or set(tool) - {"type", "function"}:
        raise ApiError(400, f"{where} must be {{\"type\": \"function\", \"function\": {{\"name\", \"description\", "
                            f"\"parameters\"}}}}, got {short(tool)}", param="tools")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise ApiError(400, f"{where}.function must be an object with a name, got {short(function)}", param="tools")
    extra = set(function) - {"name", "description", "parameters", "strict"}
    if extra:
        raise ApiError(400, f"{where}.function has fields this server does not know: {short(sorted(extra))}",
                       param="tools")
    name = function.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ApiError(400, f"{where}.function.name must be 1 to 64 letters, digits, _ or -, got {short(name)}",
                       param="tools")
    out = {"name": name}
    if function.get("description") is not None:
        if not isinstance(function["description"], str):
            raise ApiError(400, f"{where}.function.description must be a string, got "
                                f"{short(function['description'])}", param="tools")
        out["description"] = check_text(function["description"], f"{where}.function.description", "tools")
    if function.get("strict") is not None and not isinstance(function["strict"], bool):
        raise ApiError(400, f"{where}.function.strict must be true or false, got {short(function['strict'])}",
                       param="tools")
    parameters = function.get("parameters")
    if parameters is not None:
        try:
            check_schema(parameters, f"{where}.function.parameters")
            check_meta_schema(parameters, f"{where}.function.parameters")
        except RecursionError:
            raise ApiError(400, f"{where}.function.parameters is nested too deeply to read", param="tools") from None
        if parameters.get("type", "object") != "object":
            raise ApiError(400, f"{where}.function.parameters must be a schema of type object (the arguments), "
                                f"got type {short(parameters['type'])}", param="tools")
        out["parameters"] = parameters
    return {"type": "function", "function": out}


def check_schema(schema, where: str) -> None:
    """The shape of a JSON schema's keywords that name types and sub-schemas, with messages that say
    where (the meta-schema check follows; whether it compiles is checked when a call is forced)."""
    if not isinstance(schema, dict):
        raise ApiError(400, f"{where} must be a JSON schema object, got {short(schema)}", param="tools")
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not kinds or not all(isinstance(k, str) and k in SCHEMA_TYPES for k in kinds):
            raise ApiError(400, f"{where}.type must be one of {', '.join(sorted(SCHEMA_TYPES))} (or a list of them), "
                                f"got {short(kind)}", param="tools")
    properties = schema.get("properties")
    if properties is not None:
        if not isinstance(properties, dict):
            raise ApiError(400, f"{where}.properties must be an object of schemas, got {short(properties)}",
                           param="tools")
        for key, sub in properties.items():
            check_schema(sub, f"{where}.properties.{key}")
    required = schema.get("required")
    if required is not None and (not isinstance(required, list) or not all(isinstance(r, str) for r in required)):
        raise ApiError(400, f"{where}.required must be a list of property names, got {short(required)}", param="tools")
    if schema.get("enum") is not None and (not isinstance(schema["enum"], list) or not schema["enum"]):
        raise ApiError(400, f"{where}.enum must be a non-empty list, got {short(schema['enum'])}", param="tools")
    if isinstance(schema.get("items"), dict):
        check_schema(schema["items"], f"{where}.items")
    elif schema.get("items") is not None and not isinstance(schema["items"], bool):
        raise ApiError(400, f"{where}.items must be a schema, got {short(schema['items'])}", param="tools")
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key) is not None:
            if not isinstance(schema[key], list) or not schema[key]:
                raise ApiError(400, f"{where}.{key} must be a non-empty list of schemas, got {short(schema[key])}",
                               param="tools")
            for j, sub in enumerate(schema[key]):
                check_schema(sub, f"{where}.{key}[{j}]")


# ECMA-262 regex syntax that Python's re spells otherwise or lacks: named groups `(?<name>` (re: `(?P<name>`)
# and Unicode property escapes `\p{L}` (re has none: such a pattern is left to the grammar compiler)
_ECMA_NAMED_GROUP = re.compile(r"\(\?<(?![=!])")
_ECMA_PROPERTY = re.compile(r"\\[pP]\{")


def _is_regex(pattern: object) -> bool:
    """JSON Schema's "regex" format: an ECMA-262 pattern, checked with Python's re where the two agree."""
    if not isinstance(pattern, str) or _ECMA_PROPERTY.search(pattern):
        return True
    try:
        re.compile(_ECMA_NAMED_GROUP.sub("(?P<", pattern))
    except re.error:
        return False
    return True


# the one format the meta-check checks, made once rather than per request
REGEX_FORMAT = None
if Draft202012Validator is not None:
    REGEX_FORMAT = FormatChecker(formats=())
    REGEX_FORMAT.checks("regex")(_is_regex)


def check_meta_schema(schema: dict, where: str) -> None:
    """The schema against the meta-schema of the draft its `$schema` names (2020-12 when it names
    none), with patterns checked as regexes: milliseconds, where compiling it into a grammar can
    take seconds. Only a forced call compiles its tools' schemas (api.py); under tool_choice auto or
    none this is all the check. Other formats (email, uri, ...) are annotations: not checked."""
    if Draft202012Validator is None:
        return
    validator = Draft202012Validator
    if isinstance(schema.get("$schema"), str):
        with warnings.catch_warnings():  # an unknown $schema: jsonschema warns and gives the default
            warnings.simplefilter("ignore")
            validator = validator_for(schema, default=Draft202012Validator)
    try:
        validator(validator.META_SCHEMA, format_checker=REGEX_FORMAT).validate(schema)
    except ValidationError as e:  # the schema, as an instance of its meta-schema
        message = e.message if len(e.message) <= 200 else e.message[:200] + "..."  # it quotes the client's value
        raise ApiError(400, f"{where}{e.json_path.removeprefix('$')}: {message}", param="tools") from None
