"""Forms of Outgoing > Manage Authentication / Manage Users."""

from flask_wtf import FlaskForm
from wtforms import HiddenField, PasswordField, SelectField, StringField
from wtforms.validators import EqualTo, Length, Optional

from outgoing.models import KIND_DOMAIN, KIND_IP, KIND_USER


class AddUserForm(FlaskForm):
    """The "Add a user" section; which fields count depends on the chosen tab (``kind``)."""

    kind = HiddenField(default=KIND_IP)
    domain = SelectField("Domain", choices=[], validate_choice=False)
    ip_range = StringField("IP/Range", validators=[Optional(), Length(max=100)])
    username = StringField("Username", validators=[Optional(), Length(max=320)])
    password = PasswordField("Password", validators=[Optional(), Length(max=1024)])
    confirm_password = PasswordField(
        "Confirm Password",
        validators=[Optional(), EqualTo("password", message="The passwords do not match.")])
    action = HiddenField(default="add")

    def validate_kind(self, field):
        if field.data not in (KIND_IP, KIND_USER, KIND_DOMAIN):
            from wtforms.validators import ValidationError

            raise ValidationError("Choose a user type.")


class RowActionForm(FlaskForm):
    """Lock, unlock and reset carry only the CSRF token."""
