"""Exceptions users catch."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .device import DeviceInfo
    from .problem import Problem


class NoBackendError(RuntimeError):
    """No backend (or not the forced one) can serve this problem. Lists every backend's reasons."""

    def __init__(
        self,
        problem: "Problem",
        device: "DeviceInfo",
        reasons: dict[str, list[str]],
        *,
        forced: str | None = None,
        source: str = "default",
    ) -> None:
        self.problem, self.device, self.reasons, self.forced = problem, device, reasons, forced
        head = (
            f"forced backend {forced!r} (set by {source}) cannot serve this problem"
            if forced
            else "no backend can serve this problem"
        )
        lines = [head, f"  inputs: {problem.describe()}", f"  device: {device.describe()}"]
        for name, rs in reasons.items():
            lines.append(f"  `{name}` is not supported because:")
            lines.extend(f"    {r}" for r in rs)
        super().__init__("\n".join(lines))
