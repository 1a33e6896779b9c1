"""Forms of Outgoing > Manage Authentication / Manage Users: "Add a user" and row actions."""

from flask_wtf import FlaskForm
from wtforms import BooleanField, HiddenField, PasswordField, StringField
from wtforms.validators import Length, ValidationError

from outgoing.models import KIND_DOMAIN, KIND_IP, KIND_USER
from outgoing.passwords import weakness

KINDS = (KIND_IP, KIND_USER, KIND_DOMAIN)


def check_new_password(password: str | None, confirm: str | None) -> tuple[str, str] | None:
    """(field, message) when a new password is too weak or not confirmed, else None."""
    if not password:
        return "password", "Enter a password."
    problem = weakness(password)
    if problem:
        return "password", problem
    if password != (confirm or ""):
        return "confirm_password", "Confirm Password does not match Password."
    return None


class AddUserForm(FlaskForm):
    """The "Add a user" section; which fields count depends on the chosen tab (``kind``)."""

    kind = HiddenField(default=KIND_IP)
    overlap_needs_confirm = False  # set when a range overlaps another domain's (super admin)
    domain = StringField("Domain", validators=[Length(max=253)])
    ip_range = StringField("IP/Range", validators=[Length(max=100)])
    username = StringField("Username", validators=[Length(max=320)])
    password = PasswordField("Password", validators=[Length(max=1024)])
    confirm_password = PasswordField("Confirm Password", validators=[Length(max=1024)])
    # Super admins only, shown once a range overlaps another domain's (audited).
    confirm_overlap = BooleanField("Add it although it overlaps another domain's range")

    def validate_kind(self, field):
        if field.data not in KINDS:
            raise ValidationError("Choose a user type.")

    def validate_password(self, field):
        if self.kind.data in (KIND_USER, KIND_DOMAIN):
            problem = check_new_password(field.data, self.confirm_password.data)
            if problem and problem[0] == "password":
                raise ValidationError(problem[1])

    def validate_confirm_password(self, field):
        if self.kind.data in (KIND_USER, KIND_DOMAIN) and self.password.data and (
                field.data != self.password.data):
            raise ValidationError("Confirm Password does not match Password.")


class RowActionForm(FlaskForm):
    """Lock, unlock and reset carry only the CSRF token (and, for a lock, a reason)."""

    reason = StringField("Reason", validators=[Length(max=300)])
