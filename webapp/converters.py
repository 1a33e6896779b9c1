"""``<int:...>`` in the panel's routes is an id: ASCII digits up to what the id column holds
(``outgoing.ids``). Anything larger is a 404 like any id that names no row, instead of
reaching the database and overflowing there (a 500). ``<big_id:...>`` is the same for the
message log's BIGINT ids."""

from __future__ import annotations

from werkzeug.exceptions import NotFound
from werkzeug.routing import IntegerConverter, ValidationError

from outgoing.ids import MAX_BIG_ID, MAX_ID


class IdConverter(IntegerConverter):
    regex = r"[0-9]+"
    maximum = MAX_ID

    def __init__(self, map, **options) -> None:
        options.setdefault("max", self.maximum)
        super().__init__(map, **options)

    def to_python(self, value: str) -> int:
        """404 at once rather than "try the next rule": a rule of the same path for another
        method (GET and POST /users/<id>/lock) would make it a 405."""
        try:
            return super().to_python(value)
        except ValidationError:
            raise NotFound() from None


class BigIdConverter(IdConverter):
    maximum = MAX_BIG_ID


def init_app(app) -> None:
    """Before any blueprint's routes are added: they are bound to these converters."""
    app.url_map.converters["int"] = IdConverter
    app.url_map.converters["big_id"] = BigIdConverter
