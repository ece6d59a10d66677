"""The one error type for bad configuration."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, naming the offending key and (once known) the file."""

    def __init__(self, message: str, key: str = "", source: str = "") -> None:
        self.message, self.key, self.source = message, key, source
        super().__init__(self._render())

    def _render(self) -> str:
        where = f"{self.source}: " if self.source else ""
        key = f"'{self.key}': " if self.key else ""
        return f"{where}{key}{self.message}"

    def with_source(self, source: str) -> "ConfigError":
        return ConfigError(self.message, self.key, source)
