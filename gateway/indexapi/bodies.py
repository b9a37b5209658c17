"""The index API's request bodies: their msgspec shapes, decoding with a 400 that names the offending field, and the
limits a batch must keep (``gateway.indexapi.routes`` serves the routes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import msgspec

from gateway.errors import InvalidRequest, PayloadTooLarge, malformed_json_is_400, split_error_path
from gateway.settings import Settings

__all__ = [
    "DedupBody",
    "EvictBody",
    "InsertBody",
    "IntContexts",
    "Options",
    "SearchBody",
    "StrContexts",
    "check_hashable",
    "check_limits",
    "conversations",
    "decode_body",
    "decode_contexts",
    "token_estimates",
]

_LINKAGE_METHODS = frozenset({"single", "complete", "average", "weighted", "centroid", "median", "ward"})


class Options(msgspec.Struct, kw_only=True):
    alpha: float = 0.001
    use_gpu: bool = False
    linkage_method: str = "average"
    initial_tokens_per_context: int = 0
    parent_request_ids: list[str | None] | None = None
    conversation_ids: list[str | None] | None = None
    deduplicate: bool = False
    hint_template: str | None = None


class IntContexts(Options, kw_only=True):
    contexts: list[list[int]]


class StrContexts(Options, kw_only=True):
    contexts: list[list[str]]


class EvictBody(msgspec.Struct):
    request_ids: list[str]


class DedupBody(msgspec.Struct, kw_only=True):
    contexts: list[list[Any]]
    parent_request_ids: list[str | None]
    hint_template: str | None = None


class SearchBody(msgspec.Struct, kw_only=True):
    context: list[Any]
    update_access: bool = True


class InsertBody(msgspec.Struct, kw_only=True):
    context: list[Any]
    search_path: list[int] = msgspec.field(default_factory=list)
    total_tokens: int = 0


_int_decoder = msgspec.json.Decoder(IntContexts)
_str_decoder = msgspec.json.Decoder(StrContexts)


T = TypeVar("T")


def decode_body(body: bytes, type_: type[T]) -> T:
    try:
        with malformed_json_is_400():
            return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        text = str(exc)
        raise InvalidRequest(f"invalid request: {text}", param=split_error_path(text)[1], code="invalid_type") from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None


def decode_contexts(body: bytes) -> tuple[IntContexts | StrContexts, str]:
    """Contexts are all lists of ints or all lists of strings; anything else is a 400 naming the spot."""
    with malformed_json_is_400():
        try:
            return _int_decoder.decode(body), "integer"
        except msgspec.ValidationError as int_error:
            try:
                return _str_decoder.decode(body), "string"
            except msgspec.ValidationError:
                pass
            except msgspec.DecodeError as exc:  # truncated after the integer decoder stopped at a string
                raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
            text = str(int_error)
        except msgspec.DecodeError as exc:
            raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    raise InvalidRequest(
        "contexts must be a list of lists of integers, or a list of lists of strings (not mixed, not nested, "
        f"no floats or booleans): {text}",
        param=split_error_path(text)[1] or "contexts",
        code="invalid_contexts",
    )


def check_limits(
    request: Options, contexts: Sequence[Sequence[Any]], settings: Settings, *, stateless: bool = False
) -> None:
    most = min(settings.reorder_max_contexts, settings.schedule_max_contexts) if stateless else None
    most = most or settings.reorder_max_contexts
    if len(contexts) > most:
        raise PayloadTooLarge(f"at most {most} contexts per request", param="contexts", code="too_many_contexts")
    for i, context in enumerate(contexts):
        if len(context) > settings.reorder_max_blocks:
            raise PayloadTooLarge(
                f"at most {settings.reorder_max_blocks} blocks per context",
                param=f"contexts[{i}]",
                code="too_many_blocks",
            )
    if request.linkage_method not in _LINKAGE_METHODS:
        raise InvalidRequest(f"unknown linkage_method {request.linkage_method!r}", param="linkage_method")
    if not 0 <= request.alpha <= 1:
        raise InvalidRequest("alpha must be between 0 and 1", param="alpha")
    for name, values in (
        ("parent_request_ids", request.parent_request_ids),
        ("conversation_ids", request.conversation_ids),
    ):
        if values is not None and len(values) != len(contexts):
            raise InvalidRequest(f"{name} has {len(values)} entries for {len(contexts)} contexts", param=name)


def token_estimates(contexts: Sequence[Sequence[Any]], ids: Sequence[Sequence[int]]) -> dict[int, int]:
    """About 4 bytes per token: a block's weight in the plan (hits are tokens, not blocks)."""
    return {
        block: max(1, len(text.encode("utf-8", "surrogatepass")) // 4)
        for context, blocks in zip(contexts, ids, strict=True)
        for text, block in zip(context, blocks, strict=True)
    }


def conversations(request: Options) -> list[str | None] | None:
    """Which contexts belong to one conversation and must run in input order: those with the same
    ``conversation_id``, else those continuing the same ``parent_request_ids`` entry."""
    if request.conversation_ids is not None:
        return request.conversation_ids
    return request.parent_request_ids


def check_hashable(contexts: Sequence[Sequence[Any]]) -> None:
    for i, context in enumerate(contexts):
        for j, doc in enumerate(context):
            if not isinstance(doc, int | str) or isinstance(doc, bool):
                raise InvalidRequest("documents must be integers or strings", param=f"contexts[{i}][{j}]")
