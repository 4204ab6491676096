"""What a server is started with, and the rule that keeps it on this machine unless a key guards it."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from dataclasses import dataclass, field

from repomem.core import RepomemError

API_KEY_ENV = "REPOMEM_API_KEY"
DEFAULT_HOST = "127.0.0.1"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]")


@dataclass
class ServeConfig:
    host: str = DEFAULT_HOST
    port: int = 7636
    api_key: str = ""
    cors_origins: list[str] = field(default_factory=list)
    max_queue: int = 8  # waiting requests (all clients) before 503
    debounce_s: float = 0.25  # the watcher's quiet time before it syncs a batch of edits

    def check(self) -> None:
        """Refuse a bind address other machines can reach unless an API key is set."""
        if not is_loopback(self.host) and not self.api_key:
            raise RepomemError(
                f"refusing to listen on {self.host} without an API key: other machines could read the memory. "
                f"Pass --api-key, set {API_KEY_ENV}, or set server_api_key in the settings "
                "(or keep the default host 127.0.0.1)")
        if not 0 <= self.port <= 65535:
            raise RepomemError(f"port {self.port} is out of range")
        if self.max_queue < 1:
            raise RepomemError("the queue must hold at least one waiting request")

    def trusted_hosts(self) -> list[str]:
        """The names a request's `Host` header may carry (the port is not compared).

        A web page that rebinds its own domain to 127.0.0.1 still sends that domain as Host, so
        only the loopback names and the bind address are accepted. A wildcard bind (0.0.0.0, ::)
        is reached under any of the machine's names; there the API key it requires keeps pages out.
        """
        if self.host in WILDCARD_HOSTS:
            return ["*"]
        bind = f"[{self.host.strip('[]')}]" if ":" in self.host else self.host
        return list(dict.fromkeys([*LOOPBACK_NAMES, bind.lower()]))


def resolve_api_key(flag: str | None, settings_key: str = "") -> str:
    """The key from the flag, else the environment, else the settings ("" = none)."""
    return (flag or os.environ.get(API_KEY_ENV) or settings_key or "").strip()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def key_matches(supplied: str, expected: str) -> bool:
    """Constant-time comparison (of digests, so the key's length does not show either)."""
    a = hashlib.sha256(supplied.encode()).digest()
    b = hashlib.sha256(expected.encode()).digest()
    return hmac.compare_digest(a, b)
