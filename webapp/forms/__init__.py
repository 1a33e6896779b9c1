"""Flask-WTF forms, one module per page area."""

from email_validator import EmailNotValidError, validate_email
from wtforms import fields
from wtforms.validators import ValidationError

from outgoing.ids import parse_id

try:  # WTForms >= 3.3 wants SelectChoice objects; older ones take (value, label) pairs.
    from wtforms.fields.choices import SelectChoice as _Choice
except ImportError:  # pragma: no cover - older WTForms
    def _Choice(value, label):
        return (value, label)


def choices(pairs) -> list:
    """SelectField choices from (value, label) pairs, in the form this WTForms expects."""
    return [_Choice(value, label) for value, label in pairs]


class FieldList(fields.FieldList):
    """WTForms' FieldList, but a row's index is read like an id (``outgoing.ids``): WTForms
    takes any index ``str.isdigit`` passes and int() refuses some ("²", 5,000 digits), a
    500 on Save. A key with such an index is ignored, like any key no field reads."""

    def _extract_indices(self, prefix, formdata):
        offset = len(prefix) + 1
        for key in formdata:
            if key.startswith(prefix):
                index = parse_id(key[offset:].split(self._field_separator, 1)[0])
                if index is not None:
                    yield index


def optional_email(field, example: str) -> None:
    """An optional address field: empty is None, else the normalised address or a message
    naming ``example``."""
    text = (field.data or "").strip()
    if not text:
        field.data = None
        return
    try:
        field.data = validate_email(text, check_deliverability=False).normalized
    except EmailNotValidError as exc:
        raise ValidationError(f"Enter an email address such as {example} ({exc}).") from None
