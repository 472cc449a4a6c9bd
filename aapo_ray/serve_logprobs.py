"""Log-probs and ``echo`` for :mod:`aapo_ray.serve_replica`, as the OpenAI API defines them.

- ``/v1/completions``: ``logprobs: int`` (0 .. ``max_logprobs``, a server option, default 20; OpenAI caps
  at 5) and ``echo: bool``. ``choices[i].logprobs`` is ``{"tokens", "token_logprobs", "top_logprobs",
  "text_offset"}``; ``top_logprobs[j]`` maps the ``logprobs`` most likely tokens (most likely first) to
  their log-probs, plus the chosen token if it is not among them (so ``logprobs: 0`` gives the chosen
  token alone), as vLLM does. With ``echo`` the prompt's tokens come first (the first one's log-prob and
  top_logprobs are ``null``) and ``text`` is the prompt + the completion; ``max_tokens: 0`` is allowed
  with ``echo`` (score the prompt only: lm-eval's loglikelihood sends ``max_tokens: 1``, which works too).
- ``/v1/chat/completions``: ``logprobs: bool`` and ``top_logprobs: int`` (0 .. ``max_logprobs``; it needs
  ``logprobs: true``). ``choices[i].logprobs = {"content": [{"token", "logprob", "bytes", "top_logprobs":
  [{"token", "logprob", "bytes"}, ...]}], "refusal": null}`` with exactly ``top_logprobs`` alternatives.
  ``echo`` is not a chat field (400).

Every log-prob is the model's own: ``log_softmax`` of the logits at temperature 1, whatever the sampling
``temperature`` / ``top_p`` (vLLM's default, ``logprobs_mode="raw_logprobs"``), computed by one forward pass
over prompt + completion after generation (``backend.score``, the ``hf`` backend; the ``sglang`` backend
has none, so a log-prob request there is a 400). The completion's tokens are the ones ``usage`` counts:
the EOS token, when generation stopped on it, included (its text is not in ``text``). Token strings are
decoded with a few tokens of left context (leading spaces kept), special tokens shown; ``text_offset``
is the running sum of their lengths from the start of the choice's ``text`` (as vLLM). Log-probs below
-9999 are reported as -9999 (JSON has no -inf). ``stream: true`` with log-probs is refused with a 400;
``stream`` with ``echo`` sends the prompt text as each choice's first chunk. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

from aapo_ray.openai_api import APIError
from aapo_ray.sampling import Completions, TokenScores

FLOOR = -9999.0  # vLLM's floor for a -inf log-prob
_CONTEXT = 4  # tokens of left context when decoding one token's string


@dataclass(frozen=True)
class LogprobRequest:
    """What a request asks for: ``top_k`` alternatives per token (``None``: no log-probs) and ``echo``."""

    top_k: int | None = None
    echo: bool = False


def logprob_request(req, chat: bool, max_logprobs: int, can_score: bool) -> LogprobRequest:
    """Validate the request's ``logprobs`` / ``top_logprobs`` / ``echo`` (400s naming the field)."""
    if chat:
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        param, top, echo = "top_logprobs", ((req.top_logprobs or 0) if req.logprobs else None), False
    else:
        param, top, echo = "logprobs", req.logprobs, req.echo
    if top is None:
        return LogprobRequest(None, echo)
    if not 0 <= top <= max_logprobs:
        raise APIError(400, f"{param} must be between 0 and {max_logprobs}", param=param)
    if not can_score:
        raise APIError(400, "log-probs need the hf backend; this server's backend cannot score tokens",
                       param="logprobs", code="unsupported")
    if req.stream:
        raise APIError(400, "logprobs with stream: true is not supported; ask without streaming",
                       param="logprobs", code="unsupported")
    return LogprobRequest(top, echo)


def prompt_texts(req, prompts: list[list[int]], tokenizer) -> list[str]:
    """Each prompt's text for ``echo``: the string as sent, or its token ids decoded."""
    raw = req.prompt
    strings = [raw] if isinstance(raw, str) else list(raw) if raw and isinstance(raw[0], str) else None
    if strings is not None:
        return strings
    return [tokenizer.decode(p, skip_special_tokens=True) for p in prompts]


def score_rows(backend, prompts: list[list[int]], result: Completions,
               specs: list[LogprobRequest]) -> list[TokenScores | None]:
    """One ``backend.score`` call for every row that asked for log-probs (prompt + completion ids)."""
    want = [r for r, s in enumerate(specs) if s.top_k is not None]
    out: list[TokenScores | None] = [None] * len(specs)
    if not want:
        return out
    seqs = [list(prompts[r]) + [int(t) for t in result.token_ids[r]] for r in want]
    starts = [1 if specs[r].echo else len(prompts[r]) for r in want]
    for r, score in zip(want, backend.score(seqs, starts, max(specs[r].top_k for r in want))):
        out[r] = score
    return out


class _Strings:
    """Token strings with a little left context, so a token's leading space survives decoding."""

    def __init__(self, tokenizer, ids: list[int]):
        self.tokenizer, self.ids = tokenizer, ids

    def at(self, i: int, token: int | None = None) -> str:
        left = self.ids[max(0, i - _CONTEXT):i]
        token = self.ids[i] if token is None else int(token)
        prev = self.tokenizer.decode(left, skip_special_tokens=False) if left else ""
        cur = self.tokenizer.decode(left + [token], skip_special_tokens=False)
        return cur[len(prev):] if left and cur.startswith(prev) else self.tokenizer.decode([token],
                                                                                           skip_special_tokens=False)


def _lp(value) -> float:
    return max(float(value), FLOOR)


def completion_logprobs(tokenizer, prompt: list[int], completion: list[int], score: TokenScores,
                        top_k: int, echo: bool) -> dict:
    """The legacy ``logprobs`` object of one choice."""
    ids = list(prompt) + [int(t) for t in completion]
    strings = _Strings(tokenizer, ids)
    body: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for i in range(0 if echo else len(prompt), len(ids)):
        token = strings.at(i)
        body["tokens"].append(token)
        body["text_offset"].append(offset)
        offset += len(token)
        if i < score.start:
            body["token_logprobs"].append(None)
            body["top_logprobs"].append(None)
            continue
        j = i - score.start
        chosen = _lp(score.logprobs[j])
        top = {strings.at(i, t): _lp(v) for t, v in zip(score.top_ids[j][:top_k], score.top_logprobs[j][:top_k])}
        top.setdefault(token, chosen)
        body["token_logprobs"].append(chosen)
        body["top_logprobs"].append(top)
    return body


def chat_logprobs(tokenizer, prompt: list[int], completion: list[int], score: TokenScores, top_k: int) -> dict:
    """The chat ``logprobs`` object of one choice (the completion's tokens)."""
    ids = list(prompt) + [int(t) for t in completion]
    strings = _Strings(tokenizer, ids)

    def item(text: str, value) -> dict:
        return {"token": text, "logprob": _lp(value), "bytes": list(text.encode("utf-8"))}

    content = []
    for i in range(len(prompt), len(ids)):
        j = i - score.start
        entry = item(strings.at(i), score.logprobs[j])
        entry["top_logprobs"] = [item(strings.at(i, t), v)
                                 for t, v in zip(score.top_ids[j][:top_k], score.top_logprobs[j][:top_k])]
        content.append(entry)
    return {"content": content, "refusal": None}


def choice(tokenizer, spec: LogprobRequest, chat: bool, prompt: list[int], prompt_text: str | None, text: str,
           completion: list[int], score: TokenScores | None) -> tuple[str, dict | None]:
    """(text, logprobs) of one finished choice: the prompt's text first with ``echo``."""
    if spec.echo:
        text = (prompt_text or "") + text
    if spec.top_k is None or score is None:
        return text, None
    if chat:
        return text, chat_logprobs(tokenizer, prompt, completion, score, spec.top_k)
    return text, completion_logprobs(tokenizer, prompt, completion, score, spec.top_k, spec.echo)
