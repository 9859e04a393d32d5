"""Console sessions: a person signs in with an API key once and gets a signed cookie.

The cookie holds the key's SHA-256 (never the key), an expiry and a random nonce, signed with
HMAC-SHA256 under the console's secret. Every request verifies the signature and the expiry,
then the key itself through the same verifier as the API (so a revoked key ends its sessions
within the key cache's 30 s), and checks the scope the page needs, exactly as the API does.

The cookie is HttpOnly (no script reads it), SameSite=Strict (no other site's page sends it),
scoped to /ui, and Secure when the request came over HTTPS. A state-changing request (sign in,
sign out) must also come from this origin (Origin and Sec-Fetch-Site), and sign-out carries a
token derived from the session: cross-site request forgery has nothing to ride on.
"""

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import orjson
from starlette.requests import HTTPConnection, Request
from starlette.responses import RedirectResponse, Response

from service.core.access import hash_key

COOKIE = "shapstream_session"
COOKIE_PATH = "/ui"
SIGN_IN = "/ui/sign-in"
DEFAULT_PAGE = "/ui/decisions"


class SignInRequired(Exception):
    """No valid session: the browser is sent to the sign-in page, then back to `path`."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


class CrossSiteRequest(Exception):
    """A state-changing request that did not come from this service's own pages."""


@dataclass(frozen=True, slots=True)
class Session:
    key_hash: str
    expires_at: int
    # The cookie's payload as sent: what the sign-out token is derived from.
    payload: str


class Sessions:
    """Issues and checks session cookies under one secret."""

    def __init__(self, secret: bytes | None, ttl_s: int) -> None:
        # No secret configured: one per process, so sessions end with the process.
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self.ttl_s = ttl_s

    def issue(self, key: str, now: float | None = None) -> str:
        """The cookie value of a new session of `key` (already verified by the caller)."""
        expires_at = int(now if now is not None else time.time()) + self.ttl_s
        body = {"h": hash_key(key), "e": expires_at, "n": secrets.token_urlsafe(9)}
        payload = _b64(orjson.dumps(body))
        return f"{payload}.{self._sign(payload)}"

    def read(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session a cookie holds, or None when it is absent, forged or expired."""
        if not cookie:
            return None
        payload, _, signature = cookie.partition(".")
        if not hmac.compare_digest(signature.encode(), self._sign(payload).encode()):
            return None
        try:
            body = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            key_hash, expires_at = str(body["h"]), int(body["e"])
        except (ValueError, KeyError, TypeError):
            return None
        if expires_at <= (now if now is not None else time.time()):
            return None
        return Session(key_hash, expires_at, payload)

    def csrf_token(self, session: Session) -> str:
        """The token sign-out must carry: only a page of this session can know it."""
        return self._sign(f"csrf:{session.payload}")

    def check_csrf(self, session: Session, token: str) -> bool:
        return hmac.compare_digest(token.encode(), self.csrf_token(session).encode())

    def _sign(self, payload: str) -> str:
        digest = hmac.new(self._secret, payload.encode(), hashlib.sha256).digest()
        return _b64(digest)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def set_cookie(response: Response, request: Request, value: str, max_age: int) -> None:
    response.set_cookie(
        COOKIE,
        value,
        max_age=max_age,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def clear_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(
        COOKIE,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def check_same_origin(request: Request) -> None:
    """Refuse a state-changing request sent by another site's page (or a frame of it).

    Browsers say where a request comes from in Sec-Fetch-Site (every current one) and Origin;
    either naming another site is refused. A client that sends neither is no browser, and a
    forged request needs a browser carrying someone's cookie.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise CrossSiteRequest(f"sent from a {site} page")
    origin = request.headers.get("origin")
    if origin is not None and origin != _own_origin(request):
        raise CrossSiteRequest(f"sent from {origin[:100]!r}")


def _own_origin(request: Request) -> str:
    host = request.headers.get("host", request.url.netloc)
    return f"{request.url.scheme}://{host}"


def safe_next(target: str | None) -> str:
    """Where to go after sign-in: a console path of this service, never another site."""
    if not target:
        return DEFAULT_PAGE
    parts = urlsplit(target)
    path_ok = parts.path == "/ui" or parts.path.startswith("/ui/")
    if parts.scheme or parts.netloc or not path_ok or target.startswith("//"):
        return DEFAULT_PAGE
    return target


def sign_in_redirect(connection: HTTPConnection, path: str) -> RedirectResponse:
    """303 to the sign-in page, which sends the browser back to `path` afterwards."""
    root = connection.scope.get("root_path", "")
    return RedirectResponse(f"{root}{SIGN_IN}?next={quote(path, safe='/')}", status_code=303)
