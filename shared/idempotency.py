"""AIP-155 request ids: a retry with the same id returns the first result.

Every service keeps an `idempotency` table (principal, rpc, request_id -> serialized
response). A creating RPC looks its request id up and, inside the same transaction
that creates the resource, stores its response: a retry, or two racing copies of the
same request, can never create a second resource.
"""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from shared.db import now_micros

metadata = sa.MetaData()
idempotency = sa.Table(
    "idempotency",
    metadata,
    sa.Column("principal", sa.String(160), primary_key=True),
    sa.Column("rpc", sa.String(64), primary_key=True),
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("response", sa.LargeBinary, nullable=False),
    sa.Column("created_at_us", sa.BigInteger, nullable=False),
)


def recall(connection: Connection, principal: str, rpc: str, request_id: str) -> bytes | None:
    """The response stored for this request id, if the request was already carried out."""
    row = connection.execute(
        sa.select(idempotency.c.response).where(
            idempotency.c.principal == principal,
            idempotency.c.rpc == rpc,
            idempotency.c.request_id == request_id,
        )
    ).first()
    return bytes(row[0]) if row else None


def remember(connection: Connection, principal: str, rpc: str, request_id: str, response: bytes) -> None:
    """Stores the response; the primary key makes a concurrent duplicate fail its transaction."""
    connection.execute(
        idempotency.insert().values(
            principal=principal, rpc=rpc, request_id=request_id, response=response, created_at_us=now_micros()
        )
    )


def once(
    connection: Connection,
    principal: str,
    rpc: str,
    request_id: str,
    carry_out: Callable[[Connection], bytes],
) -> bytes:
    """The first response for this request id: recalled, or produced by `carry_out` and remembered.

    Call it inside the write transaction that creates the resource.
    """
    stored = recall(connection, principal, rpc, request_id)
    if stored is not None:
        return stored
    response = carry_out(connection)
    remember(connection, principal, rpc, request_id, response)
    return response
