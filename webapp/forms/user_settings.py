"""The Outgoing User Settings form: every setting of DESIGN.md, labelled with its name.

Which fields a user has depends on its type (see ``for_kind``); choices that depend on the
database (lock templates, DKIM selectors) are filled in by the route.
"""

from flask_wtf import FlaskForm
from wtforms import (
    BooleanField,
    Form,
    FormField,
    IntegerField,
    PasswordField,
    SelectField,
    StringField,
)
from wtforms.validators import InputRequired, Length, NumberRange, Optional, ValidationError

from outgoing.models import (
    ID_AUTH_USER,
    ID_ENVELOPE_SENDER,
    ID_HEADER,
    KIND_DOMAIN,
    KIND_IP,
    KIND_USER,
    QUARANTINE_ACCEPT,
    QUARANTINE_REJECT,
    REAUTH_DOMAIN,
    REAUTH_NONE,
    REAUTH_USER,
)
from scoring.identity import MAX_HEADER_NAME, MAX_PATTERN, validate_header_name, validate_regex
from webapp.forms import FieldList, choices, optional_email

MAX_HEADERS = 20
WEEK_MINUTES = 7 * 24 * 60

# One line of help per setting, in our words.
HELP = {
    "ip_range": "The address, CIDR block or range this user sends from. It cannot be "
                "changed: add a new user for another range.",
    "username": "The SMTP AUTH login of this user. It cannot be changed.",
    "password": "Leave empty to keep the current password; a new one needs at least 10 "
                "characters mixing letters, digits or symbols.",
    "password_domain": "The SMTP AUTH password of this domain (the login is the domain "
                       "name). It is not tied to any other account. Leave empty to keep it.",
    "confirm_password": "Type the new password again.",
    "domain": "The customer domain this user belongs to; its settings, DKIM keys and "
              "contact apply.",
    "identification_method": "How we tell the senders behind this user apart. Header is "
                             "recommended: a per-customer header makes spammers far "
                             "easier to find and stop.",
    "headers": "Headers searched in order; the first one present gives the identity.",
    "automatic_lock": "Stop this user after about 5 spam messages within 10 minutes. Leave "
                      "off for an IP or range that is a shared smarthost.",
    "lock_identities_automatically": "Stop just the sender (identity) after about 5 spam "
                                     "messages within 10 minutes, leaving others sending.",
    "lock_timeout_minutes": "Minutes an automatic lock lasts before sending resumes "
                            "(1 minute to 1 week, 10080).",
    "maximum_unlocks_by_timeout": "How often a lock may lift itself (0 to 100); after that "
                                  "an administrator has to unlock.",
    "lock_template_id": "The message the sender receives when their mail is locked.",
    "contact_email": "Where the lock notice goes when this user is locked, and when one of "
                     "its identities is, unless that identity is an address in this user's "
                     "domain. Empty: the username, when it is an address.",
    "connection_limits_enabled": "Cap SMTP connections per period, spam or not, to stop "
                                 "sudden bulk mailing.",
    "limit_per_month": "Connections allowed in a sliding 30 days; empty means no cap.",
    "limit_per_week": "Connections allowed in a sliding 7 days; empty means no cap.",
    "limit_per_day": "Connections allowed in a sliding 24 hours; empty means no cap.",
    "limit_per_hour": "Connections allowed in a sliding hour; empty means no cap.",
    "limit_per_minute": "Connections allowed in a sliding minute; empty means no cap.",
    "dkim_selector": "Sign this user's mail with the domain's key of this selector: the "
                     "default one once its TXT record is published (see the DKIM page), or "
                     "another key generated there.",
    "maximum_recipients_per_day": "Recipients this user may address in a sliding 24 hours; empty "
                                  "means no cap.",
    "quarantine_response": "What the sending server hears when a message is quarantined: a "
                           "bounce (550) or a silent accept (250).",
    "message_archiving": "Keep a copy of every message in this user's domain's archive (a "
                         "shared smarthost's: in the archive of the envelope sender's "
                         "domain, when it is one of ours).",
    "block_macro_attachments": "Reject messages carrying office documents that contain "
                               "macros.",
    "block_unwanted_attachments": "Reject messages carrying executables and other risky "
                                  "attachment types.",
    "reject_newly_registered_domains": "Reject mail whose sender domain was registered less "
                                       "than a day ago.",
    "reject_newly_registered_domains_unavailable":
        "Unavailable: no source of registration dates is configured, so every domain would "
        "pass. To enable it, set RDAP_URL (an RDAP server) or NEWLY_REGISTERED_LIST (a daily "
        "list file) in the configuration, or import a list with flask nrd import.",
    "reauthenticate_as": "Hand this range's mail to the user or domain of this customer "
                         "matching the envelope sender, when that one permits it; its "
                         "settings then apply.",
    "shared_smarthost": "The provider's own relay for every customer: Re-authenticate as may "
                        "then reach permitted users and domains of any customer, not only "
                        "this user's domain. Only super admins see and change this.",
    "compromise_detection": "Score how this user's senders behave (volume, spread, "
                            "refusals, copies of one content, logins, spam scores) and "
                            "throttle, hold or lock a sender whose risk climbs.",
    "detection_shadow_mode": "Compute every step and record what would have happened in "
                             "the audit log, without touching mail: tune before you enforce.",
    "detection_throttle_at": "Risk at which a sender is slowed to the throttle rate (0: "
                             "never).",
    "detection_hold_at": "Risk at which a sender's mail is accepted but kept on Held Mail "
                         "instead of relayed (0: never).",
    "detection_lock_at": "Risk at which the sender is locked, with notice and alert (0: "
                         "never).",
    "detection_throttle_rate": "Messages per minute a throttled sender may send; beyond it "
                               "their server hears 451 and retries later.",
    "detection_new_sender_allowance": "Messages per hour a sender seen for the first time "
                                      "may send before it looks unusual; it moves toward "
                                      "the sender's own habits over 7 days.",
    "detection_release_pace": "Held messages sent per minute when they are released.",
    "reauthenticate_permitted": "Let authorised IP ranges relay mail on behalf of this "
                                "user, under this user's settings and limits.",
}

IDENTIFICATION_CHOICES = [
    (ID_ENVELOPE_SENDER, "Envelope Sender"),
    (ID_AUTH_USER, "Authentication User"),
    (ID_HEADER, "Header"),
]
QUARANTINE_CHOICES = [(QUARANTINE_REJECT, "Rejected (550)"), (QUARANTINE_ACCEPT, "Accepted (250)")]
REAUTH_CHOICES = [
    (REAUTH_NONE, "Do not re-authenticate"),
    (REAUTH_USER, "Authenticating User matching the envelope sender"),
    (REAUTH_DOMAIN, "Authenticating Domain matching the envelope sender's domain"),
]


class HeaderRowForm(Form):
    """One identification header: its name, an optional RE2 pattern, and whether to strip it."""

    header_name = StringField("Header name", validators=[Length(max=MAX_HEADER_NAME * 2)])
    regex = StringField("Regular expression", validators=[Length(max=MAX_PATTERN * 2)])
    remove_header = BooleanField("Remove header")

    def validate_header_name(self, field):
        problem = validate_header_name(field.data or "")
        if problem:
            raise ValidationError(problem)

    def validate_regex(self, field):
        problem = validate_regex((field.data or "").strip())
        if problem:
            raise ValidationError(problem)


def _limit(label: str) -> IntegerField:
    return IntegerField(label, validators=[Optional(), NumberRange(
        min=1, max=1_000_000_000, message="Enter a whole number of at least 1, or leave empty.")])


def _detection(label: str, low: int, high: int) -> IntegerField:
    # Empty keeps the stored value (a form posted without the section changes nothing).
    return IntegerField(label, validators=[
        Optional(),
        NumberRange(min=low, max=high, message=f"Enter a whole number from {low} to {high}.")])


class UserSettingsForm(FlaskForm):
    ip_range = StringField("IP/Range", render_kw={"readonly": True})
    username = StringField("Username", render_kw={"readonly": True})
    password = PasswordField("Password", validators=[Length(max=1024)],
                             render_kw={"autocomplete": "new-password"})
    confirm_password = PasswordField("Confirm Password", validators=[Length(max=1024)],
                                     render_kw={"autocomplete": "new-password"})
    domain = StringField("Domain", validators=[Length(max=253)])
    identification_method = SelectField("Identification Method",
                                        choices=choices(IDENTIFICATION_CHOICES))
    headers = FieldList(FormField(HeaderRowForm), max_entries=MAX_HEADERS)
    automatic_lock = BooleanField("Automatic lock")
    lock_identities_automatically = BooleanField("Lock Identities Automatically")
    lock_timeout_minutes = IntegerField("User and Identity Lock timeout", validators=[
        InputRequired("Enter the lock timeout in minutes."),
        NumberRange(min=1, max=WEEK_MINUTES,
                    message=f"Enter 1 to {WEEK_MINUTES} minutes (one week).")])
    maximum_unlocks_by_timeout = IntegerField("Maximum unlocks by timeout", validators=[
        InputRequired("Enter how many automatic unlocks are allowed."),
        NumberRange(min=0, max=100, message="Enter a number from 0 to 100.")])
    lock_template_id = SelectField("Lock Template", choices=[], validate_choice=False)
    contact_email = StringField("Contact email", validators=[Length(max=320)],
                                render_kw={"type": "email", "autocomplete": "email"})
    connection_limits_enabled = BooleanField("Enable outgoing connection limits")
    limit_per_month = _limit("Limit per month")
    limit_per_week = _limit("Limit per week")
    limit_per_day = _limit("Limit per day")
    limit_per_hour = _limit("Limit per hour")
    limit_per_minute = _limit("Limit per minute")
    dkim_selector = SelectField("DKIM Selector", choices=[], validate_choice=False)
    maximum_recipients_per_day = _limit("Maximum number of recipients per day")
    quarantine_response = SelectField("Quarantine Response", choices=choices(QUARANTINE_CHOICES))
    message_archiving = BooleanField("Message archiving for senders")
    block_macro_attachments = BooleanField("Block attachments with macros for senders")
    block_unwanted_attachments = BooleanField("Block potentially unwanted attachments")
    reject_newly_registered_domains = BooleanField(
        "Reject messages from newly registered domains")
    reauthenticate_as = SelectField("Re-authenticate as", choices=choices(REAUTH_CHOICES))
    reauthenticate_permitted = BooleanField("Re-authenticate permitted")
    shared_smarthost = BooleanField("Shared smarthost")
    compromise_detection = BooleanField("Compromise detection")
    detection_shadow_mode = BooleanField("Shadow mode")
    detection_throttle_at = _detection("Throttle at risk", 0, 100_000)
    detection_hold_at = _detection("Hold at risk", 0, 100_000)
    detection_lock_at = _detection("Lock at risk", 0, 100_000)
    detection_throttle_rate = _detection("Throttle rate (messages per minute)", 1, 100_000)
    detection_new_sender_allowance = _detection("New sender allowance (messages per hour)",
                                                0, 1_000_000)
    detection_release_pace = _detection("Release pace (messages per minute)", 1, 100_000)
    # Shown when a super admin moves a range onto another domain's addresses (audited).
    confirm_overlap = BooleanField("Move it although it overlaps another domain's range")

    def validate_contact_email(self, field):
        optional_email(field, "postmaster@example.com")

    # The ladder climbs: Throttle <= Hold <= Lock (0 turns a rung off and is not compared).
    def _rung_at(self, name: str) -> int | None:
        field = getattr(self, name, None)
        value = field.data if field is not None else None
        return value if isinstance(value, int) and value > 0 else None

    def validate_detection_hold_at(self, field):
        hold, throttle = self._rung_at("detection_hold_at"), self._rung_at("detection_throttle_at")
        if hold is not None and throttle is not None and hold < throttle:
            raise ValidationError(f"Hold must start at or above Throttle ({throttle}).")

    def validate_detection_lock_at(self, field):
        lock = self._rung_at("detection_lock_at")
        for name, label in (("detection_hold_at", "Hold"), ("detection_throttle_at",
                                                            "Throttle")):
            below = self._rung_at(name)
            if lock is not None and below is not None and lock < below:
                raise ValidationError(f"Lock must start at or above {label} ({below}).")


# Fields each type of user does not have.
NOT_FOR = {
    KIND_IP: ("username", "password", "confirm_password", "reauthenticate_permitted"),
    KIND_USER: ("ip_range", "reauthenticate_as", "shared_smarthost", "confirm_overlap"),
    KIND_DOMAIN: ("ip_range", "username", "reauthenticate_as", "shared_smarthost",
                  "confirm_overlap"),
}
SUPER_ONLY = ("shared_smarthost", "confirm_overlap")


def for_kind(form: UserSettingsForm, kind: str, *, is_super: bool) -> UserSettingsForm:
    """Only the fields this type of user has, and that this admin may see."""
    for name in NOT_FOR[kind] + (() if is_super else SUPER_ONLY):
        if name in form:
            delattr(form, name)
    return form


SECTIONS = (
    ("Authentication", ("ip_range", "username", "password", "confirm_password", "domain")),
    ("Identification", ("identification_method",)),
    ("Locks", ("automatic_lock", "lock_identities_automatically", "lock_timeout_minutes",
               "maximum_unlocks_by_timeout", "lock_template_id", "contact_email")),
    ("Limits", ("connection_limits_enabled", "limit_per_month", "limit_per_week",
                "limit_per_day", "limit_per_hour", "limit_per_minute",
                "maximum_recipients_per_day")),
    ("Delivery and content", ("dkim_selector", "quarantine_response", "message_archiving",
                              "block_macro_attachments", "block_unwanted_attachments",
                              "reject_newly_registered_domains")),
    ("Re-authentication", ("reauthenticate_as", "shared_smarthost",
                           "reauthenticate_permitted")),
    ("Compromise detection", ("compromise_detection", "detection_shadow_mode",
                              "detection_throttle_at", "detection_hold_at",
                              "detection_lock_at", "detection_throttle_rate",
                              "detection_new_sender_allowance", "detection_release_pace")),
)

KIND_NAMES = {KIND_IP: "IP/Range", KIND_USER: "Username", KIND_DOMAIN: "Domain"}
