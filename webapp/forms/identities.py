"""Forms of Outgoing > Manage Identities."""

from flask_wtf import FlaskForm
from wtforms import StringField
from wtforms.validators import InputRequired, Length, ValidationError

from scoring.address import canonical_mailbox
from scoring.identity import MAX_IDENTITY, normalise_identity


class AddIdentityForm(FlaskForm):
    """Add an identity by hand, e.g. to lock a sender before it next sends."""

    user = StringField("Outgoing user", validators=[
        InputRequired("Enter the IP/Range, username or domain of an outgoing user."),
        Length(max=320)])
    value = StringField("Identity", validators=[
        InputRequired("Enter the identity, e.g. an address or a customer id."),
        # A first bound on what is typed; the stored spelling is measured below.
        Length(max=4 * MAX_IDENTITY,
               message=f"An identity is at most {MAX_IDENTITY} characters.")])

    def validate_value(self, field):
        field.data = (field.data or "").strip()
        if not field.data:
            raise ValidationError("Enter the identity, e.g. an address or a customer id.")
        if any(not c.isprintable() for c in field.data):
            raise ValidationError("An identity is one line of printable text.")
        # Measured as stored: a Unicode domain grows in its A-label form (xn--...), and the
        # column refused the longer value with a 500 instead of this message.
        spelled = canonical_mailbox(field.data).lower()
        if len(spelled) > MAX_IDENTITY:
            raise ValidationError(f"An identity is at most {MAX_IDENTITY} characters; with "
                                  f"its domain spelled as DNS does this one is {len(spelled)}.")
        # Stored as the proxy keys it: "Locked"@A.test is the sender locked@a.test, and a
        # row spelled otherwise was a second one the proxy never counted.
        field.data = normalise_identity(field.data)
