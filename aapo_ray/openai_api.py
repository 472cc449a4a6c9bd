"""OpenAI-compatible request validation and response bodies for :mod:`aapo_ray.serve`.

Requests are validated strictly (``"1"`` is not a number) from the raw body, so malformed JSON,
wrong types and out-of-range values all become OpenAI-style 400s:
``{"error": {"message", "type", "param", "code"}}``. No Ray or torch import here.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

# Fields of the OpenAI API this server does not implement: a request that sets them gets a 400
# rather than a silently different answer. Only undeclared fields are checked: ``echo`` is a completions
# field and ``top_logprobs`` a chat one (aapo_ray.serve_logprobs), so each is refused on the other route.
UNSUPPORTED = ("top_logprobs", "echo", "suffix", "logit_bias", "tools", "functions",
               "tool_choice", "function_call", "response_format", "best_of")
MAX_PROMPTS = 64  # prompts in one /v1/completions request


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with HTTP ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers  # extra response headers, e.g. Retry-After on a 503

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: StrictStr | None = None
    max_tokens: StrictInt | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: StrictInt = Field(1, ge=1)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = Field(None, ge=-(2**63), lt=2**64)  # torch.manual_seed's range
    stream: StrictBool = False
    stream_options: dict[str, StrictBool] | None = None
    user: StrictStr | None = None


class CompletionRequest(_Request):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    logprobs: StrictInt | None = None  # top alternatives per token (aapo_ray.serve_logprobs)
    echo: StrictBool = False


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Request):
    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None


AnyRequest = Union[CompletionRequest, ChatRequest]


def parse_request(raw: bytes, cls: type[AnyRequest]) -> AnyRequest:
    """Validate a raw JSON body; any problem raises a 400 :class:`APIError` naming the field."""
    try:
        json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    try:
        req = cls.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        param = str(first["loc"][0]) if first["loc"] else None
        raise APIError(400, f"{where or 'body'}: {first['msg']}", param=param,
                       code="invalid_value" if first["type"] != "missing" else "missing_field") from None
    for field in UNSUPPORTED:
        value = (req.model_extra or {}).get(field)
        if value not in (None, False, 0, [], {}) and not (field == "best_of" and value == req.n):
            raise APIError(400, f"{field!r} is not supported by this server", param=field, code="unsupported")
    return req


def stop_strings(req: AnyRequest) -> tuple[str, ...]:
    stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop: up to 4 non-empty strings", param="stop")
    return stops


def prompt_token_ids(req: AnyRequest, tokenizer, vocab: int, chat: bool) -> list[list[int]]:
    """The prompts' token ids: the chat template (no extra special tokens) or the completion prompt(s)
    (strings tokenized with the tokenizer's special tokens, as vLLM does; token-id lists as given)."""
    if chat:
        if not req.messages:
            raise APIError(400, "messages must be a non-empty list", param="messages")
        if not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions",
                           param="messages")
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja raise_exception, e.g. "roles must alternate"
            raise APIError(400, f"messages do not fit the chat template: {exc}", param="messages") from None
        return [tokenizer(text, add_special_tokens=False)["input_ids"]]
    prompt = req.prompt
    single = isinstance(prompt, str) or (prompt and all(isinstance(x, int) for x in prompt))
    prompts = [prompt] if single else list(prompt)
    if not prompts or len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"prompt: between 1 and {MAX_PROMPTS} prompts", param="prompt")
    ids = [tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]
    if any(not x for x in ids):
        raise APIError(400, "prompt is empty", param="prompt")
    if any(t < 0 or t >= vocab for x in ids for t in x):
        raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
    return ids


def resolve_max_tokens(req: AnyRequest, chat: bool, longest: int, context: int, limit: int,
                       allow_zero: bool = False) -> int:
    """Tokens to generate: asked for (checked against ``limit`` and the context) or the default
    (16 for completions as in OpenAI's API, the rest of the context up to ``limit`` for chat).
    ``allow_zero``: 0 is allowed (``echo``: score or return the prompt only)."""
    param = "messages" if chat else "prompt"
    if longest >= context:
        raise APIError(400, f"this model's maximum context length is {context} tokens; the prompt has "
                       f"{longest}", param=param, code="context_length_exceeded")
    asked = req.max_tokens
    if chat and req.max_completion_tokens is not None:
        asked = req.max_completion_tokens
    if asked is None:
        return min(limit, context - longest) if chat else min(16, context - longest)
    if asked < (0 if allow_zero else 1) or asked > limit:
        raise APIError(400, f"max_tokens must be between {0 if allow_zero else 1} and {limit}"
                       + ("" if allow_zero else " (0 only with echo)" if not chat else ""), param="max_tokens")
    if longest + asked > context:
        raise APIError(400, f"this model's maximum context length is {context} tokens; you asked for "
                       f"{longest + asked} ({longest} in the prompt, {asked} to generate)",
                       param="max_tokens", code="context_length_exceeded")
    return asked


def include_usage(req: AnyRequest) -> bool:
    return bool((req.stream_options or {}).get("include_usage"))


# ----------------------------------------------------------------------------- responses
class StreamText:
    """The streamed text of one choice: what has been sent, never past EOS or a stop string."""

    def __init__(self, tokenizer, eos_ids: set, stops: tuple[str, ...]):
        self.tokenizer, self.eos_ids, self.stops = tokenizer, eos_ids, stops
        self.ids: list[int] = []
        self.sent, self.done = "", False

    def push(self, token: int) -> str:
        if self.done:
            return ""
        if token in self.eos_ids:
            self.done = True
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((text.find(s) for s in self.stops if s in text), default=-1)
        if cut >= 0:
            self.done, text = True, text[:cut]
        else:  # hold back a possible start of a stop string and an unfinished character
            hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold].rstrip("\ufffd")
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, choices: list[tuple], prompt_tokens: int,
                    completion_tokens: int, chat: bool) -> dict:
    """A whole response; ``choices`` are (text, finish_reason[, logprobs]) in index order."""
    if chat:
        items = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp[0] if lp else None,
                  "finish_reason": why} for i, (text, why, *lp) in enumerate(choices)]
    else:
        items = [{"index": i, "text": text, "logprobs": lp[0] if lp else None, "finish_reason": why}
                 for i, (text, why, *lp) in enumerate(choices)]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": items, "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(rid: str, model: str, index: int, chat: bool, *, text: str | None = None,
               finish_reason: str | None = None, role: bool = False) -> dict:
    """One streamed chunk for choice ``index``."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, chat: bool, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def models_body(name: str, created: int) -> dict:
    return {"object": "list", "data": [model_card(name, created)]}


def model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "aapo-ray"}
