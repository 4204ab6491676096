"""OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}` with the matching status."""

from __future__ import annotations

from pathlib import Path

from starlette.responses import JSONResponse

from repomem.core import paths


def without_local_paths(text: str) -> str:
    """A message as a client may read it: the data folder and the user's home named, not spelled out
    (a store error names its folder; a client on another machine has no business knowing it)."""
    text = text.replace(str(paths.home()), "<repomem data>")
    home = str(Path.home())
    return text.replace(home, "~") if len(home) > 1 else text


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": without_local_paths(self.message), "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)
