"""cupy backend (work in progress)."""

IMPLEMENTATIONS: list = []
