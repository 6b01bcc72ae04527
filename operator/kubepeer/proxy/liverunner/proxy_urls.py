"""Generated proxy URLs (live-runner-wire.md 5.3): a session's app, or a `proxy: true`
single-shot app, reachable at a URL of its own, for apps that need a base URL rather than a
path under `/apps/...` (a web UI, an OpenAI-style client).

The template (`--live-runner-proxy-url`, go-livepeer's `-liveRunnerProxyUrl`, default
`<public URL>/run/{proxy}`) holds one `{proxy}`: as the last path segment (path form) or in
the host (host form, for a wildcard DNS name). `ProxyTemplate` is pure: it fills the
template and finds the id in a request. `ProxyStore` keeps each session proxy in Redis,
`kubepeer:lr:{ns}:proxy:<id>` -> {sid, route, target}, so any replica serves it; it goes
with its session.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from redis.asyncio import Redis

from kubepeer.proxy.liverunner.sessions import base32

PLACEHOLDER = "{proxy}"
KEEP_SECONDS = 24 * 3600


class BadTemplate(ValueError):
    """The template is not an absolute http(s) URL with one {proxy} where it may be."""


@dataclass(frozen=True)
class ProxyTemplate:
    template: str
    host_form: bool
    prefix: str  # host form: before {proxy} in the host; path form: the path before it
    suffix: str  # host form: after {proxy} in the host (its port stripped)
    host: str  # path form: the template's host (port included), lowercased

    @classmethod
    def parse(cls, template: str) -> ProxyTemplate:
        parts = urlsplit(template)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise BadTemplate(f"{template!r} is not an absolute http or https URL")
        if template.count(PLACEHOLDER) != 1:
            raise BadTemplate(f"{template!r} must hold {PLACEHOLDER} exactly once")
        if PLACEHOLDER in parts.netloc:
            if parts.path.strip("/"):
                raise BadTemplate(f"{template!r}: a host-form template has no path")
            host = parts.netloc.lower().rsplit(":", 1)[0] if "]" not in parts.netloc else ""
            prefix, _, suffix = host.partition(PLACEHOLDER)
            return cls(template, True, prefix, suffix, "")
        if not parts.path.endswith("/" + PLACEHOLDER) or parts.query or parts.fragment:
            raise BadTemplate(f"{template!r}: {PLACEHOLDER} must be the last path segment")
        return cls(template, False, parts.path.removesuffix(PLACEHOLDER), "",
                   parts.netloc.lower())  # fmt: skip

    def url(self, proxy_id: str) -> str:
        return self.template.replace(PLACEHOLDER, proxy_id)

    def find(self, host: str, path: str) -> tuple[str, str] | None:
        """(proxy id, the rest of the path) when the request is for a generated URL."""
        host = host.lower()
        if self.host_form:
            name = host.rsplit(":", 1)[0] if not host.startswith("[") else host
            if not (name.startswith(self.prefix) and name.endswith(self.suffix)):
                return None
            proxy_id = name[len(self.prefix) : len(name) - len(self.suffix)]
            return (proxy_id, path) if proxy_id and "." not in proxy_id else None
        if host != self.host or not path.startswith(self.prefix):
            return None
        proxy_id, slash, rest = path[len(self.prefix) :].partition("/")
        return (proxy_id.lower(), slash + rest) if proxy_id else None

    def claims_path(self, path: str) -> bool:
        """Whether a path-form template's prefix covers `path` (routing, before the host)."""
        return not self.host_form and path.startswith(self.prefix)


def new_proxy_id() -> str:
    """26 lowercase base32 characters (128 bits), as go-livepeer's."""
    return base32(secrets.token_bytes(16))


@dataclass(frozen=True)
class SessionProxy:
    proxy_id: str
    sid: str
    route: str
    target: str  # the URL on the session's replica it reaches


class ProxyStore:
    def __init__(self, redis: Redis, namespace: str) -> None:
        self.redis = redis
        self.prefix = f"kubepeer:lr:{namespace}:proxy"

    async def add(self, proxy: SessionProxy) -> None:
        key = f"{self.prefix}:{proxy.proxy_id}"
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"sid": proxy.sid, "route": proxy.route,
                                    "target": proxy.target})  # fmt: skip
            pipe.expire(key, KEEP_SECONDS)
            await pipe.execute()

    async def touch(self, proxy_id: str) -> None:
        """Used again: it outlives its last use by KEEP_SECONDS (a backstop: a proxy goes
        with its session, and one whose session is gone is dropped when next asked for)."""
        await self.redis.expire(f"{self.prefix}:{proxy_id}", KEEP_SECONDS)

    async def get(self, proxy_id: str) -> SessionProxy | None:
        fields = await self.redis.hgetall(f"{self.prefix}:{proxy_id}")
        if not fields:
            return None
        text = {k.decode(): v.decode() for k, v in fields.items()}
        return SessionProxy(proxy_id, text["sid"], text["route"], text["target"])

    async def drop(self, proxy_ids: list[str]) -> None:
        if proxy_ids:
            await self.redis.delete(*(f"{self.prefix}:{p}" for p in proxy_ids))
