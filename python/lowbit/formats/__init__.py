"""Weight formats: pack / unpack / convert, in plain torch."""
from . import gguf, gptq, int4, int8  # noqa: F401
