"""triton backend (work in progress)."""

IMPLEMENTATIONS: list = []
