"""Privacy notices: which version is in effect, and which consents it outdates."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.consent.store import notices


@dataclass(frozen=True)
class NoticeVersion:
    version: int
    material: bool
    effective_at_us: int
    url: str


class NoticeSchedule:
    """All versions of one purpose's notice, oldest first."""

    def __init__(self, versions: list[NoticeVersion]):
        self.versions = sorted(versions, key=lambda v: v.version)

    @classmethod
    def load(cls, connection: Connection, purpose: str) -> NoticeSchedule:
        rows = connection.execute(
            sa.select(notices.c.version, notices.c.material, notices.c.effective_at_us, notices.c.url).where(
                notices.c.purpose == purpose
            )
        )
        return cls([NoticeVersion(r.version, r.material, r.effective_at_us, r.url) for r in rows])

    def get(self, version: int) -> NoticeVersion | None:
        return next((v for v in self.versions if v.version == version), None)

    def latest(self) -> NoticeVersion | None:
        return self.versions[-1] if self.versions else None

    def in_effect(self, now_us: int) -> int:
        """The newest version in effect at now_us; 0 when none is."""
        return max((v.version for v in self.versions if v.effective_at_us <= now_us), default=0)

    def material_in_effect(self, now_us: int) -> int:
        """The newest material version in effect: consents under older versions need renewal."""
        return max(
            (v.version for v in self.versions if v.material and v.effective_at_us <= now_us), default=0
        )

    def renew_by(self, notice_version: int, now_us: int) -> int | None:
        """When a material version newer than `notice_version` takes effect later, its time."""
        pending = [
            v.effective_at_us
            for v in self.versions
            if v.material and v.version > notice_version and v.effective_at_us > now_us
        ]
        return min(pending, default=None)

    def url_of(self, version: int) -> str:
        found = self.get(version)
        return found.url if found else ""
