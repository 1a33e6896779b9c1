"""The Lock Templates form: name, subject and body (sandboxed Jinja), and for a super admin
the domain it belongs to (empty: every domain may use it)."""

from flask_wtf import FlaskForm
from wtforms import StringField, TextAreaField
from wtforms.validators import InputRequired, Length

from outgoing.lock_templates import MAX_BODY_SOURCE, MAX_SUBJECT_SOURCE

HELP = {
    "name": "How the template appears in the Lock Template list of the user settings.",
    "subject": "Subject of the lock notice; placeholders like {{ user }} are filled in. "
               "Empty uses the built-in subject.",
    "body": "Text of the lock notice; see the placeholders below. Empty uses the built-in "
            "text.",
    "domain": "The domain whose users may choose this template; empty shares it with every "
              "domain.",
}


class LockTemplateForm(FlaskForm):
    name = StringField("Name", validators=[InputRequired("Give the template a name."),
                                           Length(max=100)])
    subject = StringField("Subject", validators=[Length(max=MAX_SUBJECT_SOURCE)])
    body = TextAreaField("Body", validators=[Length(max=MAX_BODY_SOURCE)],
                         render_kw={"rows": 16, "spellcheck": "false"})
    domain = StringField("Domain", validators=[Length(max=253)])
