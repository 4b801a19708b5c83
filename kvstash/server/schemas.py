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
    messages: list[Message] = Field(min_length=1)
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
    n: StrictInt | None = None  # only 1 is supported
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


class Choice(BaseModel):
    index: int = 0
    message: ChatMessage
    finish_reason: str
    logprobs: None = None


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
    logprobs: None = None


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
    text: StrictStr


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
