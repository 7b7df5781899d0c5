"""Ollama's API bodies: /api/chat and /api/generate requests, which convert themselves
to `GenerateParams`, their NDJSON lines, and /api/tags, /api/show, /api/ps, /api/version.

Decoding is the validation: an unknown field, or an out-of-range value, is
InvalidParams naming it as the client sent it (`options.temperature`), since the
sampling fields are typed with `GenerateParams`'s own ranges.

`options`: mapped are `temperature`, `top_p`, `top_k`, `min_p`, `seed` (-1: random),
`num_predict` (-1 and -2: corral's `generation.default_max_tokens`), `stop`,
`repeat_penalty`, `presence_penalty` and `frequency_penalty`. Ignored are the knobs of
llama.cpp's memory, threads and batching (`num_ctx`, `num_batch`, `num_gpu`,
`main_gpu`, `low_vram`, `numa`, `num_thread`, `num_keep`, `use_mmap`, `use_mlock`,
`vocab_only`, `logits_all`, `embedding_only`, `f16_kv`), which corral sets in its own
config, plus `repeat_last_n` (mlx_lm's penalty window is 20 tokens), `penalize_newline`
(deprecated by Ollama) and `mirostat_tau` / `mirostat_eta` (they only matter with
mirostat). Refused unless neutral: `mirostat` (0), `tfs_z` and `typical_p` (1):
corral cannot sample that way and will not silently sample another. An unknown key is
refused. `tool_choice` is corral's extension (Ollama has none): OpenAI's values.
Unset options take corral's defaults (greedy, no penalty), not Ollama's per-model ones.

Not supported, and refused when given a value that asks for them: `images`, `think`
(true), `suffix`, `template`, `context` (replies carry none) and `logprobs`.
This module holds data and its conversion only; `server/ollama.py` shapes replies.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Final, Literal

import msgspec

from corral.protocol.durations import keep_alive_seconds
from corral.protocol.errors import Code, EngineClientError
from corral.protocol.grammar import (
    JsonObjectFormat,
    JsonSchema,
    JsonSchemaFormat,
    ResponseFormat,
)
from corral.protocol.messages import (
    MAX_INT32,
    ChatMessage,
    Duration,
    Fraction,
    FunctionCall,
    GenerateParams,
    Name,
    Penalty,
    Probability,
    RepetitionPenalty,
    StopStrings,
    Temperature,
    ToolCall,
    ToolChoice,
    Tools,
    TopK,
)

__all__ = ["API_VERSION", "ChatLine", "ChatRequest", "ErrorBody", "GenerateLine",
           "GenerateRequest", "ModelDetails", "ModelEntry", "Options", "ReplyMessage",
           "RunningModel", "RunningModels", "ShowRequest", "ShowResponse", "Tags",
           "ToolCallOut", "Version"]

API_VERSION: Final = "0.9.0"
"""The Ollama version whose API corral's follows, as GET /api/version reports it
(clients gate features on it)."""

_NumPredict = Annotated[int, msgspec.Meta(ge=-2, le=MAX_INT32)]
_OllamaSeed = Annotated[int, msgspec.Meta(ge=-1, le=2**63 - 1)]


class Options(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`options`: see the module's docstring for what is mapped, ignored and refused."""

    temperature: Temperature | None = None
    top_p: Probability | None = None
    top_k: TopK | None = None
    min_p: Fraction | None = None
    seed: _OllamaSeed | None = None
    num_predict: _NumPredict | None = None
    stop: StopStrings | None = None
    repeat_penalty: RepetitionPenalty | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    tool_choice: ToolChoice | None = None  # corral's extension
    # Refused unless neutral (`check`).
    mirostat: int = 0
    tfs_z: float = 1.0
    typical_p: float = 1.0
    # Ignored: llama.cpp's resources, and knobs that only matter with a refused one.
    num_ctx: int | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    low_vram: bool | None = None
    numa: bool | None = None
    num_thread: int | None = None
    num_keep: int | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    vocab_only: bool | None = None
    logits_all: bool | None = None
    embedding_only: bool | None = None
    f16_kv: bool | None = None
    repeat_last_n: int | None = None
    penalize_newline: bool | None = None
    mirostat_tau: float | None = None
    mirostat_eta: float | None = None

    def check(self) -> None:
        """Refuse the sampling knobs corral lacks, unless they are neutral.

        Raises:
            EngineClientError: InvalidParams naming the option.
        """
        for name, neutral in (("mirostat", 0), ("tfs_z", 1), ("typical_p", 1)):
            if getattr(self, name) != neutral:
                _unsupported(f"options.{name}", f"only {neutral} is")

    def max_tokens(self) -> int | None:
        """`num_predict` as `max_tokens`: None for -1, -2 or unset.

        Raises:
            EngineClientError: InvalidParams for 0.
        """
        if self.num_predict == 0:
            raise EngineClientError(Code.INVALID_PARAMS,
                                    "options.num_predict: expected >= 1, or -1 (no limit)",
                                    {"field": "options.num_predict"})
        return self.num_predict if self.num_predict and self.num_predict > 0 else None


def _unsupported(field: str, why: str) -> None:
    raise EngineClientError(Code.INVALID_PARAMS, f"{field}: not supported; {why}",
                            {"field": field})


class FunctionCallOut(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A call's function as Ollama writes it: arguments as an object, not JSON text."""

    name: str
    arguments: dict[str, Any]
    index: int | None = None


class ToolCallOut(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True,
                  forbid_unknown_fields=True):
    """A tool call in an assistant message (sent back by the client) or in a reply."""

    function: FunctionCallOut
    id: str | None = None
    type: Literal["function"] = "function"


class Message(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A chat turn as Ollama's clients send it. `tool_name` names the tool a `tool` turn
    answers; `thinking` (an earlier reply's reasoning) is dropped."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCallOut] | None = None
    tool_name: Name | None = None
    tool_call_id: Name | None = None

    def to_chat_message(self, index: int) -> ChatMessage:
        """This turn as the runtime's (a call's arguments as JSON text, as OpenAI's).

        Raises:
            EngineClientError: InvalidParams for images.
        """
        if self.images:
            _unsupported(f"messages[{index}].images", "corral serves text models")
        calls = [ToolCall(call.id or f"call_{index}_{position}",
                          FunctionCall(call.function.name, json.dumps(call.function.arguments)))
                 for position, call in enumerate(self.tool_calls or ())]
        return ChatMessage(role=self.role, content=self.content or "", tool_calls=calls,
                           tool_call_id=self.tool_call_id, name=self.tool_name)


class _Request(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What /api/chat and /api/generate share. `format`: "json" (any JSON object) or a
    JSON schema, by constrained decoding. `keep_alive`: seconds or a duration string
    (0: unload right after; negative: keep for good). `stream` is true unless false."""

    model: Name
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: Options = Options()
    stream: bool = True
    keep_alive: float | Duration | None = None
    think: bool | str | None = None
    logprobs: bool = False
    top_logprobs: int = 0

    def _check(self) -> None:
        self.options.check()
        if self.think not in (None, False):
            _unsupported("think", "corral does not separate a model's thinking")
        if self.logprobs or self.top_logprobs:
            _unsupported("logprobs", "use the OpenAI API (/v1) for log-probabilities")

    def _response_format(self) -> ResponseFormat | None:
        if self.format == "json":
            return JsonObjectFormat()
        if isinstance(self.format, dict):
            return JsonSchemaFormat(JsonSchema(name="format", schema=self.format))
        return None

    def keep_alive_s(self) -> float | None:
        """`keep_alive` in seconds (see `corral.protocol.durations`); None when unset."""
        return None if self.keep_alive is None else keep_alive_seconds(self.keep_alive)

    def _params(self, request_id: str, client: str, *, prompt: str | None,
                messages: list[ChatMessage] | None,
                tools: list[Any] | None = None) -> GenerateParams:
        """The one conversion: every value was typed on the way in with the range
        `GenerateParams` declares, so it is built as it is, never re-decoded."""
        self._check()
        options = self.options
        return GenerateParams(
            model=self.model, prompt=prompt, messages=messages,
            max_tokens=options.max_tokens(),
            temperature=options.temperature or 0.0,
            top_p=options.top_p if options.top_p is not None else 1.0,
            top_k=options.top_k or 0, min_p=options.min_p or 0.0,
            repetition_penalty=options.repeat_penalty,
            presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty,
            seed=options.seed if options.seed is not None and options.seed >= 0 else None,
            stop=options.stop, tools=tools, tool_choice=options.tool_choice,
            separate_reasoning=False,  # `think` is refused: the text keeps its markers
            response_format=self._response_format(), request_id=request_id,
            client=client, keep_alive=self.keep_alive_s())


class ChatRequest(_Request, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """POST /api/chat. No messages only loads the model (or, with `keep_alive` 0,
    unloads it), as Ollama does."""

    messages: list[Message] = []
    tools: Tools | None = None

    def to_generate_params(self, request_id: str, client: str) -> GenerateParams:
        """This request as the runtime runs it."""
        messages = [m.to_chat_message(i) for i, m in enumerate(self.messages)]
        return self._params(request_id, client, prompt=None, messages=messages,
                            tools=self.tools)


class GenerateRequest(_Request, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """POST /api/generate: `prompt` (with `system`) through the model's chat template,
    or as it is with `raw`. No prompt only loads (or unloads) the model."""

    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list[str] | None = None
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None

    def to_generate_params(self, request_id: str, client: str) -> GenerateParams:
        """This request as the runtime runs it.

        Raises:
            EngineClientError: InvalidParams naming a field corral does not support.
        """
        for field, value, why in (
                ("images", self.images, "corral serves text models"),
                ("suffix", self.suffix, "corral has no fill-in-the-middle"),
                ("template", self.template, "the model's chat template is used "
                 "(generation.models[].chat_template replaces it)"),
                ("context", self.context, "send the conversation to /api/chat instead")):
            if value:
                _unsupported(field, why)
        if self.raw:
            return self._params(request_id, client, prompt=self.prompt, messages=None)
        turns = [ChatMessage(role="system", content=self.system)] if self.system else []
        turns.append(ChatMessage(role="user", content=self.prompt))
        return self._params(request_id, client, prompt=None, messages=turns)


class ShowRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """POST /api/show; older clients name the model `name`."""

    model: Name | None = None
    name: Name | None = None
    verbose: bool = False

    @property
    def alias(self) -> str:
        """The model asked for.

        Raises:
            EngineClientError: InvalidParams when neither field is given.
        """
        alias = self.model or self.name
        if not alias:
            raise EngineClientError(Code.INVALID_PARAMS, "model: required field missing",
                                    {"field": "model"})
        return alias


# -- replies ---------------------------------------------------------------------------


class ReplyMessage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The reply's turn; `tool_calls` only when the model made some."""

    role: Literal["assistant"]
    content: str
    tool_calls: list[ToolCallOut] | None = None


class _Line(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What every line (and whole reply) carries; the counts and durations (ns) only
    on the last, with `done` true. `load_duration` is the time before the request's
    stream opened (admission, and a load on demand), `prompt_eval_duration` from then
    to the first token, `eval_duration` from the first token to the last."""

    model: str
    created_at: str
    done: bool
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class ChatLine(_Line, frozen=True, kw_only=True, omit_defaults=True):
    message: ReplyMessage


class GenerateLine(_Line, frozen=True, kw_only=True, omit_defaults=True):
    response: str


class ErrorBody(msgspec.Struct, frozen=True):
    """Every error: the whole body, or the last line of a stream that failed."""

    error: str


class ModelDetails(msgspec.Struct, frozen=True, kw_only=True):
    format: str = "mlx"
    family: str = ""
    families: list[str] = []
    parameter_size: str = ""
    quantization_level: str = ""
    parent_model: str = ""


class ModelEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One model of GET /api/tags. `digest` names the model's alias and files, not
    their content; `size` is the bytes of its files when they are at hand, else 0."""

    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class Tags(msgspec.Struct, frozen=True):
    models: list[ModelEntry]


class RunningModel(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One loaded model of GET /api/ps; `expires_at` is absent when it stays loaded for
    good or while a request holds it."""

    name: str
    model: str
    size: int
    digest: str
    details: ModelDetails
    size_vram: int = 0
    expires_at: str | None = None
    context_length: int | None = None


class RunningModels(msgspec.Struct, frozen=True):
    models: list[RunningModel]


class ShowResponse(msgspec.Struct, frozen=True, kw_only=True):
    """POST /api/show: what corral knows of the model; `capabilities` says whether it
    takes tools."""

    modelfile: str
    parameters: str
    template: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class Version(msgspec.Struct, frozen=True):
    version: str
    corral: str
