"""Page tokens and feed cursors: opaque, bound to their RPC and filters, authenticated.

One codec for every List and Watch RPC of every service. A token is the unpadded
base64url of

    version (1 byte) | position (compact JSON array of ints and strings) | MAC (16 bytes)

where MAC is HMAC-SHA256, truncated to 16 bytes, over the version, the scope the token
was issued for (the RPC's full method name, or a feed's name), a canonical JSON of the
request's filters and the position. Neither scope nor filters travel in the token: a
token read under another scope or other filters fails its MAC like an edited one.

`read` checks the length, the base64, the version and the MAC (in constant time) before
anything of the position is parsed, so any token the caller edited, forged, truncated,
or took from another RPC or from the same RPC with other filters is INVALID_ARGUMENT
(reason INVALID_PAGE_TOKEN) naming the field, and only positions this service issued
reach a query.

Feed cursors a caller keeps for a long time (profile's interaction-feed cursors, which
a recommender stores and sends back days later) are tokens of this codec too, scoped to
the feed rather than to one RPC so that ListInteractions and WatchInteractions accept
each other's. Consent's change feed resumes from a revision instead: a public,
monotonic number that each change carries, range-checked like any other integer.

The key (NAJIMI_PAGE_TOKEN_KEY, or a generated key file in the data directory, see
shared/keys.py) must be the same on every replica of a service, so that any replica
accepts what another issued; a token only ever goes back to the service that issued it,
so services need not share it (in development they share the data directory's file).
Replacing it invalidates every outstanding token and stored feed cursor (callers get
INVALID_PAGE_TOKEN and start over from the first page or an empty cursor).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Sequence

from google.protobuf.descriptor import ServiceDescriptor

from shared.errors import InvalidArgument
from shared.keys import configured_key
from shared.settings import Settings

KEY_VARIABLE = "NAJIMI_PAGE_TOKEN_KEY"
KEY_FILE = "page-token.key"
KEY_BYTES = 32
MAC_BYTES = 16
VERSION = 1
# A position holds a few ids (at most 128 characters each) and integers: far below this.
MAX_TOKEN_CHARS = 1024
INT64 = (-(2**63), 2**63 - 1)

Position = tuple[int | str, ...]
_INVALID = (
    "is not a token this RPC issued for these filters (it was altered, comes from another "
    "RPC or other filters, or outlived a key change): send the first page's filters, or no "
    "token to start over"
)


def invalid_token(field: str) -> InvalidArgument:
    return InvalidArgument(field, _INVALID, reason="INVALID_PAGE_TOKEN")


def _filters_bytes(filters: object) -> bytes:
    # ensure_ascii: the same bytes whatever the filters' characters; sort_keys: whatever their order.
    return json.dumps(filters, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


class PageTokens:
    """Issues and reads the tokens of one key."""

    def __init__(self, key: bytes):
        if len(key) != KEY_BYTES:
            raise ValueError(f"a page-token key has {KEY_BYTES} bytes")
        self._key = key

    @classmethod
    def from_settings(cls, settings: Settings) -> PageTokens:
        """The service's codec: NAJIMI_PAGE_TOKEN_KEY, else <data_dir>/page-token.key."""
        return cls(
            configured_key(
                settings.page_token_key.get_secret_value(),
                KEY_VARIABLE,
                settings.data_dir,
                KEY_FILE,
                KEY_BYTES,
            )
        )

    def of_service(self, service: ServiceDescriptor) -> ServiceTokens:
        return ServiceTokens(self, service)

    def _mac(self, scope: str, filters: object, body: bytes) -> bytes:
        signed = b"%s\x00%s\x00%s" % (scope.encode(), _filters_bytes(filters), body)
        return hmac.new(self._key, signed, hashlib.sha256).digest()[:MAC_BYTES]

    def issue(self, scope: str, filters: object, position: Position) -> str:
        """The token for `position` (the place after the last row served) under `scope` and `filters`."""
        body = bytes([VERSION]) + json.dumps(list(position), separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(body + self._mac(scope, filters, body)).rstrip(b"=").decode()

    def read(
        self, token: str, scope: str, filters: object, shape: Sequence[type], field: str = "page_token"
    ) -> Position | None:
        """The position in `token` (None for an empty token: the first page).

        `shape` is the type of each element of the position (int or str); every int is
        within the signed 64-bit range of the database. Anything else is
        INVALID_ARGUMENT (reason INVALID_PAGE_TOKEN) naming `field`.
        """
        if not token:
            return None
        if len(token) > MAX_TOKEN_CHARS:
            raise invalid_token(field)
        try:
            raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise invalid_token(field) from None
        body, mac = raw[:-MAC_BYTES], raw[-MAC_BYTES:]
        if (
            len(body) < 1
            or body[0] != VERSION
            or not hmac.compare_digest(mac, self._mac(scope, filters, body))
        ):
            raise invalid_token(field)
        # Authentic: this service (or a replica) wrote it. The shape is still checked, in case a
        # position's layout changed between releases that share a key.
        try:
            position = json.loads(body[1:])
        except ValueError:
            raise invalid_token(field) from None
        if not isinstance(position, list) or len(position) != len(shape):
            raise invalid_token(field)
        for value, kind in zip(position, shape, strict=True):
            if type(value) is not kind or (isinstance(value, int) and not INT64[0] <= value <= INT64[1]):
                raise invalid_token(field)
        return tuple(position)


class ServiceTokens:
    """The tokens of one gRPC service's RPCs, each scoped to its full method name."""

    def __init__(self, codec: PageTokens, service: ServiceDescriptor):
        self.codec = codec
        self.service = service

    def scope(self, method: str) -> str:
        if method not in self.service.methods_by_name:
            raise KeyError(f"{self.service.full_name} has no RPC {method}")
        return f"/{self.service.full_name}/{method}"

    def issue(self, method: str, filters: object, position: Position) -> str:
        return self.codec.issue(self.scope(method), filters, position)

    def read(
        self, method: str, token: str, filters: object, shape: Sequence[type], field: str = "page_token"
    ) -> Position | None:
        return self.codec.read(token, self.scope(method), filters, shape, field)
