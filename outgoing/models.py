"""The domain model shared by the control panel, the SMTP proxy and the worker.

Plain SQLAlchemy 2 declarative classes (no Flask import), so the proxy and the worker use the
same tables through ``outgoing.db`` while the web app uses them through Flask-SQLAlchemy.
A setting's column name is the same word as the form field and the scoring argument.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    event,
    false,
    select,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


# Outgoing user types, as the control panel names them.
KIND_IP = "ip"
KIND_USER = "user"
KIND_DOMAIN = "domain"
KIND_LABELS = {
    KIND_IP: "Authenticating IP or Range",
    KIND_USER: "Authenticating User",
    KIND_DOMAIN: "Authenticating Domain",
}

ID_ENVELOPE_SENDER = "envelope_sender"
ID_AUTH_USER = "auth_user"
ID_HEADER = "header"

QUARANTINE_REJECT = "reject"
QUARANTINE_ACCEPT = "accept"

REAUTH_NONE = "none"
REAUTH_USER = "user"
REAUTH_DOMAIN = "domain"

# "DKIM Selector" = the provider's default selector (DKIM_DEFAULT_SELECTOR), whose key each
# domain gets on first use; signing starts once its TXT record was found published.
DKIM_DEFAULT = "@default"

LOCK_MANUAL = "manual"
LOCK_AUTOMATIC = "automatic"


class Domain(Base):
    __tablename__ = "domains"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(253), unique=True)
    abuse_report_address: Mapped[str | None] = mapped_column(String(320))
    quarantine_report_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Admin(Base):
    """A control-panel login: a super admin (no domain) or a domain admin (one domain)."""

    __tablename__ = "admins"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    domain_id: Mapped[int | None] = mapped_column(ForeignKey("domains.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # Part of the id a session holds: raised on logout and on a new password, it ends every
    # session (and copied cookie) signed before.
    session_generation: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    domain: Mapped[Domain | None] = relationship()

    @property
    def is_super(self) -> bool:
        return self.domain_id is None

    # Flask-Login's protocol, spelled out so this module needs no Flask import.
    is_authenticated = True
    is_active = True
    is_anonymous = False

    def get_id(self) -> str:
        return f"{self.id}:{self.session_generation}"

    def end_sessions(self) -> None:
        self.session_generation = (self.session_generation or 0) + 1


class LockState:
    """Columns shared by everything that can be locked (outgoing users and identities)."""

    locked: Mapped[bool] = mapped_column(Boolean, default=False)
    lock_kind: Mapped[str | None] = mapped_column(String(16))
    lock_reason: Mapped[str | None] = mapped_column(String(500))
    locked_at: Mapped[datetime | None] = mapped_column(DateTime)
    # Changes with every lock, so a scheduled unlock can tell "still the same lock".
    lock_id: Mapped[str | None] = mapped_column(String(64))
    automatic_unlocks_used: Mapped[int] = mapped_column(Integer, default=0)


class OutgoingUser(LockState, Base):
    """An authentication method: an IP/range, a username or a domain, with every setting."""

    __tablename__ = "outgoing_users"
    __table_args__ = (
        UniqueConstraint("kind", "name", name="uq_outgoing_users_kind_name"),
        Index("ix_outgoing_users_domain_name", "domain_id", "name"),
        Index("ix_outgoing_users_ip", "ip_family", "ip_first"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    domain_id: Mapped[int] = mapped_column(ForeignKey("domains.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(8))
    # The IP/range text, the username or the domain name: fixed once added.
    name: Mapped[str] = mapped_column(String(320), index=True)
    # IP users: the range as fixed-width hex, so ranges sort and compare in SQL.
    ip_family: Mapped[int | None] = mapped_column(Integer)
    ip_first: Mapped[str | None] = mapped_column(String(32))
    ip_last: Mapped[str | None] = mapped_column(String(32))
    password_hash: Mapped[str | None] = mapped_column(String(255))
    contact_email: Mapped[str | None] = mapped_column(String(320))

    identification_method: Mapped[str] = mapped_column(String(16), default=ID_ENVELOPE_SENDER)
    automatic_lock: Mapped[bool] = mapped_column(Boolean, default=True)
    lock_identities_automatically: Mapped[bool] = mapped_column(Boolean, default=True)
    lock_timeout_minutes: Mapped[int] = mapped_column(Integer, default=60)
    maximum_unlocks_by_timeout: Mapped[int] = mapped_column(Integer, default=3)
    lock_template_id: Mapped[int | None] = mapped_column(
        ForeignKey("lock_templates.id", ondelete="SET NULL")
    )
    connection_limits_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    limit_per_month: Mapped[int | None] = mapped_column(Integer)
    limit_per_week: Mapped[int | None] = mapped_column(Integer)
    limit_per_day: Mapped[int | None] = mapped_column(Integer)
    limit_per_hour: Mapped[int | None] = mapped_column(Integer)
    limit_per_minute: Mapped[int | None] = mapped_column(Integer)
    dkim_selector: Mapped[str | None] = mapped_column(String(63), default=DKIM_DEFAULT)
    maximum_recipients_per_day: Mapped[int | None] = mapped_column(Integer)
    quarantine_response: Mapped[str] = mapped_column(String(8), default=QUARANTINE_REJECT)
    message_archiving: Mapped[bool] = mapped_column(Boolean, default=False)
    block_macro_attachments: Mapped[bool] = mapped_column(Boolean, default=False)
    block_unwanted_attachments: Mapped[bool] = mapped_column(Boolean, default=False)
    reject_newly_registered_domains: Mapped[bool] = mapped_column(Boolean, default=False)
    reauthenticate_as: Mapped[str] = mapped_column(String(8), default=REAUTH_NONE)
    reauthenticate_permitted: Mapped[bool] = mapped_column(Boolean, default=False)
    # The provider's own relay serving every customer (super admins only): its
    # "Re-authenticate as" may reach permitted users of any domain, not just its own.
    shared_smarthost: Mapped[bool] = mapped_column(Boolean, default=False,
                                                   server_default=false())

    # Compromise detection (scoring/risk.py): create_outgoing_user sets both from the
    # provider's default for new users (GlobalSetting "detection_default", shadow mode when
    # unset); the columns' own defaults only serve rows made outside it.
    compromise_detection: Mapped[bool] = mapped_column(Boolean, default=True,
                                                       server_default=true())
    detection_shadow_mode: Mapped[bool] = mapped_column(Boolean, default=True,
                                                        server_default=true())
    detection_throttle_at: Mapped[int] = mapped_column(Integer, default=60, server_default="60")
    detection_hold_at: Mapped[int] = mapped_column(Integer, default=120, server_default="120")
    detection_lock_at: Mapped[int] = mapped_column(Integer, default=400, server_default="400")
    detection_throttle_rate: Mapped[int] = mapped_column(Integer, default=10,
                                                         server_default="10")
    detection_new_sender_allowance: Mapped[int] = mapped_column(Integer, default=20,
                                                                server_default="20")
    detection_release_pace: Mapped[int] = mapped_column(Integer, default=30,
                                                        server_default="30")

    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    domain: Mapped[Domain] = relationship(lazy="joined")
    lock_template: Mapped[LockTemplate | None] = relationship()
    identification_headers: Mapped[list[IdentificationHeader]] = relationship(
        order_by="IdentificationHeader.position",
        cascade="all, delete-orphan",
    )

    @property
    def kind_label(self) -> str:
        return KIND_LABELS[self.kind]

    @property
    def limits(self) -> dict[str, int | None]:
        """Connection limits per window, or nothing when limits are off."""
        if not self.connection_limits_enabled:
            return {}
        return {
            "month": self.limit_per_month,
            "week": self.limit_per_week,
            "day": self.limit_per_day,
            "hour": self.limit_per_hour,
            "minute": self.limit_per_minute,
        }


class IdentificationHeader(Base):
    """One header the identity is read from, in order; first match wins."""

    __tablename__ = "identification_headers"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(
        ForeignKey("outgoing_users.id", ondelete="CASCADE"), index=True
    )
    position: Mapped[int] = mapped_column(Integer, default=0)
    header_name: Mapped[str] = mapped_column(String(100))
    regex: Mapped[str | None] = mapped_column(String(500))
    remove_header: Mapped[bool] = mapped_column(Boolean, default=False)


class Identity(LockState, Base):
    """Who, behind an outgoing user, actually sent: created on first sight.

    ``domain_id`` repeats the user's domain so that one domain's identities (a domain admin's
    Manage Identities) page in index order however many there are; it is filled in from the
    user on insert and follows the user when the user moves to another domain."""

    __tablename__ = "identities"
    __table_args__ = (UniqueConstraint("user_id", "value", name="uq_identities_user_value"),
                      Index("ix_identities_domain_value", "domain_id", "value", "id"))

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("outgoing_users.id", ondelete="CASCADE"))
    domain_id: Mapped[int] = mapped_column(
        ForeignKey("domains.id", ondelete="CASCADE", name="fk_identities_domain_id"))
    value: Mapped[str] = mapped_column(String(255), index=True)
    message_count: Mapped[int] = mapped_column(Integer, default=0)
    spam_count: Mapped[int] = mapped_column(Integer, default=0)
    first_seen: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(DateTime, default=utcnow)

    user: Mapped[OutgoingUser] = relationship(lazy="joined")


@event.listens_for(Identity, "before_insert")
def _identity_domain(mapper, connection, target: Identity) -> None:
    if target.domain_id is None:
        target.domain_id = connection.scalar(
            select(OutgoingUser.domain_id).where(OutgoingUser.id == target.user_id))


class LockTemplate(Base):
    """The mail sent to a sender whose outgoing mail was locked (Jinja, sandboxed)."""

    __tablename__ = "lock_templates"

    id: Mapped[int] = mapped_column(primary_key=True)
    domain_id: Mapped[int | None] = mapped_column(ForeignKey("domains.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    subject: Mapped[str] = mapped_column(String(500))
    body: Mapped[str] = mapped_column(Text)


class DkimKey(Base):
    __tablename__ = "dkim_keys"
    __table_args__ = (UniqueConstraint("domain_id", "selector", name="uq_dkim_domain_selector"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    domain_id: Mapped[int] = mapped_column(ForeignKey("domains.id", ondelete="CASCADE"))
    selector: Mapped[str] = mapped_column(String(63))
    algorithm: Mapped[str] = mapped_column(String(16), default="rsa")
    private_key_pem: Mapped[str] = mapped_column(Text)
    public_key_b64: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # The last "Check DNS": whether <selector>._domainkey.<domain> carries this key.
    dns_checked_at: Mapped[datetime | None] = mapped_column(DateTime)
    dns_published: Mapped[bool] = mapped_column(Boolean, default=False,
                                                server_default=false())
    dns_problem: Mapped[str | None] = mapped_column(String(300))


class StoredMessage:
    """Columns shared by quarantined and archived messages: the envelope and a body pointer."""

    domain_id: Mapped[int] = mapped_column(ForeignKey("domains.id", ondelete="CASCADE"))
    mail_from: Mapped[str] = mapped_column(String(320))
    rcpt_tos: Mapped[str] = mapped_column(Text)  # JSON list
    subject: Mapped[str] = mapped_column(String(500), default="")
    size: Mapped[int] = mapped_column(Integer, default=0)
    storage_key: Mapped[str] = mapped_column(String(200))
    # The body itself where the store is the database (PostgreSQL deployments).
    body: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)
    received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)


class QuarantinedMessage(StoredMessage, Base):
    __tablename__ = "quarantined_messages"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("outgoing_users.id", ondelete="SET NULL"), index=True
    )
    identity: Mapped[str | None] = mapped_column(String(255))
    client_ip: Mapped[str | None] = mapped_column(String(45))
    reason: Mapped[str] = mapped_column(String(500))
    score: Mapped[float] = mapped_column(Float, default=0.0)
    rules: Mapped[str] = mapped_column(Text, default="[]")  # JSON list
    released_at: Mapped[datetime | None] = mapped_column(DateTime)


HELD = "held"  # waiting: released by an administrator or when the risk has fallen
QUEUED = "queued"  # released: the worker sends it at the user's release pace
SENDING = "sending"  # claimed by a worker; a stale claim is taken over (worker killed)
RELEASED = "released"  # the next hop accepted it (for some recipients: see last_error)
# The next hop deferred it (4xx, or could not be reached): sent again after the retry delays
# (DEFER_RETRY_SECONDS after ``claimed_at``, the last attempt), until DEFER_GIVE_UP_SECONDS
# after ``queued_at`` (the release).
RETRYING = "retrying"
REFUSED = "refused"  # no recipient took it: refused for good, or given up; sender told (DSN)


class HeldMessage(StoredMessage, Base):
    """Mail the Hold rung accepted (250) and stored, not relayed: the quarantine's storage."""

    __tablename__ = "held_messages"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("outgoing_users.id", ondelete="SET NULL"), index=True
    )
    identity: Mapped[str | None] = mapped_column(String(255))
    client_ip: Mapped[str | None] = mapped_column(String(45))
    risk: Mapped[float] = mapped_column(Float, default=0.0)
    signals: Mapped[str] = mapped_column(Text, default="{}")  # JSON: signal -> points
    state: Mapped[str] = mapped_column(String(16), default=HELD, index=True)
    queued_at: Mapped[datetime | None] = mapped_column(DateTime)
    claim: Mapped[str | None] = mapped_column(String(32))
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    released_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(String(500))


class GlobalSetting(Base):
    """Provider-wide settings a super admin changes in the panel (name -> value)."""

    __tablename__ = "global_settings"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(500))


class ArchivedMessage(StoredMessage, Base):
    __tablename__ = "archived_messages"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("outgoing_users.id", ondelete="SET NULL")
    )


class AuditEvent(Base):
    """Who did what, when, to which object: every lock, unlock and change."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(320))
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[int | None] = mapped_column(Integer)
    domain_id: Mapped[int | None] = mapped_column(
        ForeignKey("domains.id", ondelete="CASCADE"), index=True
    )
    detail: Mapped[str] = mapped_column(Text, default="{}")  # JSON: reason, before/after


class UsedToken(Base):
    """Unlock-link token ids already spent, so each link works once."""

    __tablename__ = "used_tokens"

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    used_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ConfirmedAddress(Base):
    """An address outside a domain that someone there agreed to get its notices at (the link
    of ``outgoing.notify_addresses``): abuse reports, alerts and lock notices go to no other
    outside address, so a customer cannot have the provider mail anyone it likes."""

    __tablename__ = "confirmed_addresses"
    __table_args__ = (UniqueConstraint("domain_id", "address"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    domain_id: Mapped[int] = mapped_column(ForeignKey("domains.id", ondelete="CASCADE"))
    address: Mapped[str] = mapped_column(String(320))
    confirmed_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class MessageLogEntry(Base):
    """One SMTP transaction, whatever its outcome (``outgoing/message_log.py``).

    No foreign keys: the log outlives users and domains it names, and on PostgreSQL the
    table is partitioned by day (migration 0004), where retention drops whole partitions.
    ``domain_id`` scopes a row to a domain admin; a row without one (refused before anyone
    authenticated) is for super admins only. ``stream_id`` (the Redis stream entry) makes
    writing an entry twice, after a crashed worker, a no-op.
    """

    __tablename__ = "message_log"
    __table_args__ = (
        Index("ix_message_log_at", "at", "id"),
        Index("ix_message_log_domain_at", "domain_id", "at", "id"),
        Index("ix_message_log_sender_at", "mail_from", "at", "id"),
        Index("ix_message_log_user_at", "user_id", "at", "id"),
        Index("ix_message_log_message_id", "message_id"),
        Index("ix_message_log_queue_id", "queue_id"),
        Index("uq_message_log_stream_id", "stream_id", "at", unique=True),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    stream_id: Mapped[str] = mapped_column(String(32))
    stage: Mapped[str] = mapped_column(String(16))
    verdict: Mapped[str] = mapped_column(String(16))
    client_ip: Mapped[str | None] = mapped_column(String(45))
    domain_id: Mapped[int | None] = mapped_column(Integer)
    user_id: Mapped[int | None] = mapped_column(Integer)
    user_name: Mapped[str | None] = mapped_column(String(320))
    login: Mapped[str | None] = mapped_column(String(320))
    identity: Mapped[str | None] = mapped_column(String(320))
    mail_from: Mapped[str | None] = mapped_column(String(320))
    rcpt_count: Mapped[int] = mapped_column(Integer, default=0)
    refused_count: Mapped[int] = mapped_column(Integer, default=0)
    recipients: Mapped[str | None] = mapped_column(Text)  # the first N, one per line
    message_id: Mapped[str | None] = mapped_column(String(320))
    subject: Mapped[str | None] = mapped_column(String(300))
    size: Mapped[int | None] = mapped_column(Integer)
    score: Mapped[float | None] = mapped_column(Float)
    rules: Mapped[str | None] = mapped_column(Text)  # JSON list
    reply: Mapped[str | None] = mapped_column(String(512))
    next_hop_reply: Mapped[str | None] = mapped_column(String(512))
    queue_id: Mapped[str | None] = mapped_column(String(32))
    relay_seconds: Mapped[float | None] = mapped_column(Float)
    stored_kind: Mapped[str | None] = mapped_column(String(16))  # quarantine | archive
    stored_id: Mapped[int | None] = mapped_column(Integer)


# An id, once given, is never given again: ids travel in links, RQ jobs (a release carries a
# quarantined message's id), markers and digests, and SQLite without AUTOINCREMENT hands the
# id of a deleted highest row to the next one, so a late job or an old link would act on
# someone else's row. (PostgreSQL's sequences never go back; migration 0010 rebuilt the
# SQLite tables made before.)
for _table in Base.metadata.tables.values():
    if "id" in _table.c and _table.c.id.primary_key:
        _table.dialect_kwargs["sqlite_autoincrement"] = True
del _table
