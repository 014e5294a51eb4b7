"""Pure-torch reference implementations: the ground truth for tests. Clarity over speed."""
from . import attention, fused, int4, int8  # noqa: F401
