"""Optional C parser for the common HTTP/1.x heads (see ``kernel_side.protocols.http1``)."""

from collections.abc import Callable, Sequence

from kernel_side.protocols.http1 import HttpRequest, HttpResponse

def configure(
    request_cls: type[HttpRequest],
    response_cls: type[HttpResponse],
    requests_py: Callable[[bytes, int], list[HttpRequest]],
    responses_py: Callable[..., list[HttpResponse]],
) -> None: ...
def looks_like_request(data: bytes) -> bool: ...
def parse_requests(data: bytes, total_len: int) -> list[HttpRequest]: ...
def parse_responses(
    data: bytes, total_len: int, request_methods: Sequence[str] = ()
) -> list[HttpResponse]: ...
def counts() -> tuple[int, int]: ...
