"""OpenAI-shaped request and response bodies, and the API error every 4xx/5xx answers with."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param

    @property
    def type(self) -> str:
        return "invalid_request_error" if self.status < 500 else "server_error"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


MAX_MESSAGES = 512  # messages in one chat request
MAX_DOCUMENT_CHARS = 2_000_000  # characters of one registered document's text
MAX_TOP_LOGPROBS = 20


class _Request(BaseModel):
    # clients send many optional OpenAI fields we do not use (user, metadata, store, ...): ignore them
    model_config = ConfigDict(extra="ignore")


class TextPart(_Request):
    type: Literal["text"]
    text: StrictStr


class Message(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Request):
    include_usage: StrictBool = False


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    model: StrictStr | None = None  # None: the served model
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    # greedy when omitted (OpenAI's default is 1.0; small models answer better greedy)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None  # newer clients send this instead of max_tokens
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    ignore_eos: StrictBool = False  # vLLM's extension: answer to max_tokens even past an end-of-sequence token
    n: StrictInt | None = None  # only 1 is supported
    logprobs: StrictBool | None = False  # each answer token's log-probability, in choices[].logprobs.content
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # with logprobs: alternatives per token
    documents: list[StrictStr] = []  # kvstash extension: registered document ids, placed in this order
    reuse: StrictStr | None = None  # kvstash extension: this request's reuse method (blend:0.15); None: the server's
    token_view: StrictBool = False  # kvstash extension: the prompt's tokens and which were recomputed, in ``kvstash``


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV came from the store


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None  # the token's UTF-8 bytes


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class Choice(BaseModel):
    index: int = 0
    message: ChatMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    kvstash: dict  # extension: the engine's timings and reuse accounting (GenerationResult.summary())


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    kvstash: dict | None = None  # extension, on the chunk with the finish reason: as ChatCompletion's, less the answer


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvstash"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class DocumentRequest(_Request):
    text: StrictStr = Field(max_length=MAX_DOCUMENT_CHARS)


class DocumentInfo(BaseModel):
    id: str
    object: Literal["document"] = "document"
    chunks: int  # document segments the text was cut into
    tokens: int  # tokens of all chunks as placed in a prompt
    created: int


class DocumentDeleted(BaseModel):
    id: str
    object: Literal["document"] = "document"
    deleted: bool = True


# --- /v1/completions ----------------------------------------------------------------------------------


class CompletionRequest(_Request):
    prompt: StrictStr | list[StrictInt]  # text, or token ids
    model: StrictStr | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)  # greedy when omitted
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: StrictInt | None = None  # 16 when omitted, as in the OpenAI API
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    ignore_eos: StrictBool = False  # as in chat
    n: StrictInt | None = None  # only 1 is supported
    logprobs: StrictInt | None = Field(None, ge=0, le=5)  # the chosen token's and this many likeliest per token
    echo: StrictBool = False  # only False is supported
    documents: list[StrictStr] = []  # kvstash extension: their chunks go before the prompt, in this order
    reuse: StrictStr | None = None  # kvstash extension, as in chat


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    kvstash: dict | None = None  # extension, as in chat


# --- /tokenize, /detokenize (vLLM's shapes) ----------------------------------------------------------


class TokenizeRequest(_Request):
    prompt: StrictStr
    model: StrictStr | None = None
    add_special_tokens: StrictBool = True


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(_Request):
    tokens: list[StrictInt]
    model: StrictStr | None = None


class DetokenizeResponse(BaseModel):
    prompt: str
