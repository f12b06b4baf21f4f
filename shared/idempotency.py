"""AIP-155 request ids: a retry with the same id returns the first result.

Every service keeps an `idempotency` table with one row per (principal, RPC,
request_id): a keyed digest of the request, the serialized reply, the customer the
reply is about (if any) and when it was stored. A creating RPC goes through
`Idempotency.once` inside the transaction that creates the resource:
- the first call claims the request id before it does the work, so a concurrent copy
  of the same request waits on the key, then loses it and is run again by
  Database.write, when it finds the winner's reply;
- a retry (same id, same request) gets the stored reply;
- the same id with a different request is INVALID_ARGUMENT, reason REQUEST_ID_REUSED.

The digest is an HMAC-SHA256 (the service's pseudonym key, shared/keys.py) of the
request's deterministic serialization with its request_id cleared: it tells requests
apart without being a plain hash of what they say (an erasure's digest covers only the
customer id, and must not reveal it).

Replies that hold personal data are deleted with their customer (`forget_customers`,
called by every service's erasure), and a service may seal them (profile encrypts
them) through the `seal`/`unseal` hooks. Rows older than the retention
(NAJIMI_IDEMPOTENCY_RETENTION_HOURS, default 168: a retry a week later is answered as
the first call was; after that, it is a new request) are purged by the service's next
idempotent write, at most once every PURGE_INTERVAL_US.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import sqlalchemy as sa
from google.protobuf.message import Message
from sqlalchemy.engine import Connection

from shared.db import now_micros
from shared.errors import InvalidArgument
from shared.keys import keyed_hash, pseudonym_key
from shared.settings import Settings

HOUR_US = 3_600 * 1_000_000
# How often (at most) a process deletes expired rows, during one of its writes.
PURGE_INTERVAL_US = 60 * 1_000_000
# The reply of a claimed request id until its work is done (never seen outside the transaction).
CLAIMED = b""

metadata = sa.MetaData()
idempotency = sa.Table(
    "idempotency",
    metadata,
    sa.Column("principal", sa.String(160), primary_key=True),
    sa.Column("rpc", sa.String(64), primary_key=True),
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("response", sa.LargeBinary, nullable=False),
    sa.Column("created_at_us", sa.BigInteger, nullable=False),
    # NULL only on rows stored before the digests (they are answered as retries).
    sa.Column("request_digest", sa.LargeBinary(32), nullable=True),
    # The customer the reply is about; NULL when it is about none (or must not say).
    sa.Column("customer_id", sa.String(128), nullable=True),
)

# (reply, context) -> what is stored, and back; the context names the row, so a sealed
# reply copied to another row does not open there.
Seal = Callable[[bytes, str], bytes]


@dataclass(frozen=True)
class StoredReply:
    """A reply kept for retries of a request about a customer (unsealed), for exports."""

    principal: str
    rpc: str
    request_id: str
    created_at_us: int
    response: bytes


def request_reused() -> InvalidArgument:
    return InvalidArgument(
        "request_id", "was already used for a different request", reason="REQUEST_ID_REUSED"
    )


def _key(principal: str, rpc: str, request_id: str) -> sa.ColumnElement[bool]:
    return sa.and_(
        idempotency.c.principal == principal,
        idempotency.c.rpc == rpc,
        idempotency.c.request_id == request_id,
    )


class Idempotency:
    """A service's stored replies: one per (principal, RPC, request id)."""

    def __init__(
        self,
        key: bytes,
        retention_hours: float,
        seal: Seal | None = None,
        unseal: Seal | None = None,
        clock: Callable[[], int] = now_micros,
    ):
        self._key = key
        self.retention_us = int(retention_hours * HOUR_US)
        self._seal = seal
        self._unseal = unseal
        self._clock = clock
        self._next_purge_us = 0

    @classmethod
    def from_settings(
        cls, settings: Settings, seal: Seal | None = None, unseal: Seal | None = None
    ) -> Idempotency:
        return cls(pseudonym_key(settings), settings.idempotency_retention_hours, seal, unseal)

    def digest(self, request: Message) -> bytes:
        """HMAC-SHA256 of the request without its request_id (see the module docstring)."""
        copy = type(request)()
        copy.CopyFrom(request)
        copy.ClearField("request_id")  # type: ignore[arg-type]
        return hmac.new(self._key, copy.SerializeToString(deterministic=True), hashlib.sha256).digest()

    def pseudonym(self, value: str) -> str:
        """The keyed hash (HMAC-SHA256, hex) of `value` under this service's pseudonym key: what
        an erasure leaves in records kept for accounting (e.g. replenishment's orders)."""
        return keyed_hash(self._key, value)

    @staticmethod
    def context(principal: str, rpc: str, request_id: str) -> str:
        return f"idempotency/{principal}/{rpc}/{request_id}"

    def recall(self, connection: Connection, principal: str, rpc: str, request: Message) -> bytes | None:
        """The reply stored for this request id, if it was already carried out.

        Raises REQUEST_ID_REUSED when the id was used for a different request.
        """
        request_id = request.request_id  # type: ignore[attr-defined]
        row = connection.execute(
            sa.select(
                idempotency.c.response, idempotency.c.request_digest, idempotency.c.created_at_us
            ).where(_key(principal, rpc, request_id))
        ).first()
        if row is None:
            return None
        if row.created_at_us < self._clock() - self.retention_us:  # expired, not purged yet: forgotten
            connection.execute(idempotency.delete().where(_key(principal, rpc, request_id)))
            return None
        if row.request_digest is not None and not hmac.compare_digest(
            bytes(row.request_digest), self.digest(request)
        ):
            raise request_reused()
        return self._opened(bytes(row.response), principal, rpc, request_id)

    def remember(
        self,
        connection: Connection,
        principal: str,
        rpc: str,
        request: Message,
        reply: bytes,
        customer_id: str | None = None,
    ) -> None:
        """Stores the reply; the primary key makes a concurrent duplicate fail its transaction."""
        request_id = request.request_id  # type: ignore[attr-defined]
        connection.execute(
            idempotency.insert().values(
                principal=principal,
                rpc=rpc,
                request_id=request_id,
                response=self._sealed(reply, principal, rpc, request_id),
                created_at_us=self._clock(),
                request_digest=self.digest(request),
                customer_id=customer_id,
            )
        )
        self._purge_soon(connection)

    def run(
        self,
        connection: Connection,
        principal: str,
        rpc: str,
        request: Message,
        carry_out: Callable[[Connection], bytes],
        customer_id: str | None = None,
    ) -> tuple[bytes, bool]:
        """The first reply for this request id, and whether this call produced it.

        Call it inside the write transaction that creates the resource; `customer_id`
        names the customer the reply is about, so their erasure deletes it.
        """
        stored = self.recall(connection, principal, rpc, request)
        if stored is not None:
            return stored, False
        # Claimed before the work: a concurrent copy waits on this key, then fails and is re-run.
        self.remember(connection, principal, rpc, request, CLAIMED, customer_id)
        reply = carry_out(connection)
        request_id = request.request_id  # type: ignore[attr-defined]
        connection.execute(
            idempotency.update()
            .where(_key(principal, rpc, request_id))
            .values(response=self._sealed(reply, principal, rpc, request_id))
        )
        return reply, True

    def once(
        self,
        connection: Connection,
        principal: str,
        rpc: str,
        request: Message,
        carry_out: Callable[[Connection], bytes],
        customer_id: str | None = None,
    ) -> bytes:
        """`run`'s reply alone."""
        return self.run(connection, principal, rpc, request, carry_out, customer_id)[0]

    def reply_of(self, connection: Connection, principal: str, rpc: str, request_id: str) -> bytes | None:
        """The stored reply of this request id, unsealed, whatever the request was."""
        row = connection.execute(
            sa.select(idempotency.c.response).where(_key(principal, rpc, request_id))
        ).first()
        return self._opened(bytes(row.response), principal, rpc, request_id) if row is not None else None

    def detach_reply(
        self, connection: Connection, principal: str, rpc: str, request_id: str, reply: bytes
    ) -> None:
        """Replaces this request id's stored reply by `reply` (e.g. pseudonymised), about no
        customer: an erasure of its customer then leaves it, digest and age unchanged."""
        connection.execute(
            idempotency.update()
            .where(_key(principal, rpc, request_id))
            .values(response=self._sealed(reply, principal, rpc, request_id), customer_id=None)
        )

    def forget_customers(self, connection: Connection, customer_ids: Iterable[str]) -> int:
        """Deletes every stored reply about these customers (an erasure); returns how many."""
        ids = list(customer_ids)
        if not ids:
            return 0
        return int(
            connection.execute(idempotency.delete().where(idempotency.c.customer_id.in_(ids))).rowcount
        )

    def replies_about(self, connection: Connection, customer_ids: Iterable[str]) -> list[StoredReply]:
        """The stored replies about these customers, oldest first (an export)."""
        rows = connection.execute(
            sa.select(idempotency)
            .where(idempotency.c.customer_id.in_(list(customer_ids)))
            .order_by(idempotency.c.created_at_us, idempotency.c.request_id)
        )
        return [
            StoredReply(
                row.principal,
                row.rpc,
                row.request_id,
                row.created_at_us,
                self._opened(bytes(row.response), row.principal, row.rpc, row.request_id),
            )
            for row in rows
        ]

    def purge_expired(self, connection: Connection) -> int:
        """Deletes the rows older than the retention; returns how many."""
        cutoff = self._clock() - self.retention_us
        return int(
            connection.execute(idempotency.delete().where(idempotency.c.created_at_us < cutoff)).rowcount
        )

    def _purge_soon(self, connection: Connection) -> None:
        now = self._clock()
        if now >= self._next_purge_us:
            self._next_purge_us = now + PURGE_INTERVAL_US
            self.purge_expired(connection)

    def _sealed(self, reply: bytes, principal: str, rpc: str, request_id: str) -> bytes:
        if self._seal is None or reply == CLAIMED:
            return reply
        return self._seal(reply, self.context(principal, rpc, request_id))

    def _opened(self, stored: bytes, principal: str, rpc: str, request_id: str) -> bytes:
        if self._unseal is None:
            return stored
        return self._unseal(stored, self.context(principal, rpc, request_id))
