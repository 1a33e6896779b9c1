"""Forms of the Domains page (admin level) and Outgoing > Settings (domain level)."""

from flask_wtf import FlaskForm
from wtforms import BooleanField, SelectField, StringField
from wtforms.validators import InputRequired, Length, ValidationError

from outgoing.held import DEFAULT_CHOICES
from outgoing.users import normalise_domain
from webapp.forms import choices, optional_email

SETTINGS_HELP = {
    "abuse_report_address": "The administrator's contact: abuse reports (ARF) about "
                            "quarantined mail and lock alerts with unlock links go here. "
                            "Leave empty to send none.",
    "quarantine_report_enabled": "Mail the address above a summary of the outgoing "
                                 "quarantine once a day.",
}


class DomainForm(FlaskForm):
    name = StringField("Domain name", validators=[InputRequired("Enter a domain name."),
                                                  Length(max=253)])

    def validate_name(self, field):
        try:
            field.data = normalise_domain(field.data)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None


class DomainSettingsForm(FlaskForm):
    abuse_report_address = StringField("Abuse report address", validators=[Length(max=320)],
                                       render_kw={"type": "email", "autocomplete": "email"})
    quarantine_report_enabled = BooleanField("Daily quarantine report")

    def validate_abuse_report_address(self, field):
        optional_email(field, "abuse@example.com")

    def validate_quarantine_report_enabled(self, field):
        if field.data and not (self.abuse_report_address.data or "").strip():
            raise ValidationError("The daily report needs an Abuse report address to go to.")


class DetectionDefaultForm(FlaskForm):
    """The provider's default for new outgoing users (super admins only)."""

    detection_default = SelectField("Compromise detection for new users",
                                    choices=choices(DEFAULT_CHOICES))


DETECTION_DEFAULT_HELP = ("Applies to outgoing users added from now on, in every domain. "
                          "Shadow mode records what detection would have done without "
                          "touching mail, so you can tune the thresholds first.")
