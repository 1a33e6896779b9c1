"""Flask-WTF forms, one module per page area."""

try:  # WTForms >= 3.3 wants SelectChoice objects; older ones take (value, label) pairs.
    from wtforms.fields.choices import SelectChoice as _Choice
except ImportError:  # pragma: no cover - older WTForms
    def _Choice(value, label):
        return (value, label)


def choices(pairs) -> list:
    """SelectField choices from (value, label) pairs, in the form this WTForms expects."""
    return [_Choice(value, label) for value, label in pairs]
