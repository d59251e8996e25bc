"""``POST /v1/embeddings``: the request (validated here) and the response, in OpenAI's shapes.

``input`` is a string, a list of strings, a list of token ids, or a list of token-id lists.
``encoding_format`` is ``float`` or ``base64`` (little-endian float32, what the ``openai`` SDK
asks for when its caller says nothing). Emptiness, counts and lengths are checked by the
service (llm/embeddings.py), which knows the model's limits.
"""
from __future__ import annotations

import base64
from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from llm.embeddings import MAX_INPUTS, EmbeddingResult
from server.schemas.json_types import json_int
from server.schemas.openai_compat import documented_as

TokenId = json_int(ge=0, le=2**31 - 1)
Text = Annotated[str, StringConstraints(max_length=1_000_000)]


# What is served, as OpenAPI shows it: values outside still parse and get a specific 400 (empty
# input, too many inputs, too many tokens: the token limit is the model's, ~1 token per character
# at worst for MiniLM's word pieces, hence 254 characters here; ids outside its vocabulary).
_TEXT = {"type": "string", "minLength": 1, "maxLength": 254}
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 30521}, "minItems": 1, "maxItems": 254}
_INPUT_SCHEMA = {"anyOf": [_TEXT, {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": MAX_INPUTS}, _IDS,
                           {"type": "array", "items": _IDS, "minItems": 1, "maxItems": MAX_INPUTS}]}


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # the SDK sends extra_body entries at the top level

    input: Annotated[Text | Annotated[list[Text], Field(max_length=MAX_INPUTS + 1)] |
                     Annotated[list[TokenId], Field(max_length=100_000)] |
                     Annotated[list[Annotated[list[TokenId], Field(max_length=100_000)]],
                               Field(max_length=MAX_INPUTS + 1)], documented_as(_INPUT_SCHEMA)] = Field(description=f"Text or token ids: one, or a list of up to {MAX_INPUTS}. Empty inputs and inputs past "
                          "the model's token limit get 400 (never truncated).")
    model: str | None = Field(None, description="An embedding model id from /v1/models (default: the first "
                                                "installed one of defaults.embedding)")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32 bytes")
    dimensions: json_int(ge=1, le=100_000) | None = Field(None, description="Only the model's own size")
    user: str | None = None

    def inputs(self) -> list[str] | list[list[int]]:
        """The inputs as a list: one string or one token-id list becomes a list of one."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if value and isinstance(value[0], int):
            return [value]  # one token-id list
        return value


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 of little-endian float32")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


def embedding_response(result: EmbeddingResult, encoding_format: str) -> JSONResponse:
    """The EmbeddingResponse body, serialized directly: hundreds of floats per vector make pydantic's
    validate-then-serialize pass a measurable share of a small request (the schema documents it)."""
    import numpy as np

    vectors = np.ascontiguousarray(result.vectors, dtype="<f4")
    if encoding_format == "base64":
        data = [base64.b64encode(v.tobytes()).decode("ascii") for v in vectors]
    else:
        data = vectors.tolist()
    return JSONResponse({
        "object": "list", "model": result.model,
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}})
