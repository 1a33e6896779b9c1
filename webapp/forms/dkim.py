"""The DKIM key form: a selector and the key type."""

from flask_wtf import FlaskForm
from wtforms import SelectField, StringField
from wtforms.validators import InputRequired, Length, ValidationError

from outgoing.dkim import valid_selector
from webapp.forms import choices

ALGORITHM_CHOICES = [("rsa", "RSA 2048 (works everywhere)"), ("ed25519", "Ed25519 (short keys)")]
HELP = {
    "selector": "A name for this key, e.g. mail2025; it becomes "
                "<selector>._domainkey.<domain> in DNS.",
    "algorithm": "RSA 2048 is understood by every receiver; Ed25519 is newer and shorter, "
                 "best published next to an RSA key.",
}


class DkimKeyForm(FlaskForm):
    selector = StringField("Selector", validators=[InputRequired("Enter a selector."),
                                                   Length(max=63)])
    algorithm = SelectField("Key type", choices=choices(ALGORITHM_CHOICES), default="rsa")

    def validate_selector(self, field):
        field.data = (field.data or "").strip().lower()
        if not valid_selector(field.data):
            raise ValidationError("Use letters, digits and inner hyphens (dots separate "
                                  "labels), e.g. mail2025.")
