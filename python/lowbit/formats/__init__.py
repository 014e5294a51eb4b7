"""Weight formats: pack / unpack / convert, in plain torch."""
from . import int8  # noqa: F401
