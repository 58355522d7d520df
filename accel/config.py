"""Base class for plug-in configs: validated dataclasses saved and loaded as JSON.

    >>> from caching import StaticCacheConfig
    >>> cfg = StaticCacheConfig(interval=3, warmup_steps=2)
    >>> cfg.save("/tmp/static.json")
    >>> StaticCacheConfig.load("/tmp/static.json") == cfg
    True
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from .errors import ConfigError

FORMAT_VERSION = 1


class PluginConfig:
    """Mixin for ``@dataclass`` configs.

    Subclasses set ``kind`` (``"cache"`` or ``"attention"``: one cache per model, stackable with
    sparse attention) and validate in ``__post_init__`` by raising :class:`ConfigError`.
    """

    kind: ClassVar[str] = "cache"
    format_name: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}
        return {"format": self.format_name or type(self).__name__, "format_version": FORMAT_VERSION, **data}

    def save(self, path: str | os.PathLike) -> None:
        """Write the config as JSON, atomically (a crash never leaves half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config"):
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        expected = cls.format_name or cls.__name__
        if data.get("format", expected) != expected:
            raise ConfigError(f"{source}: field 'format' is {data.get('format')!r}, expected {expected!r}")
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ConfigError(f"{source}: field 'format_version' is {version!r}, expected {FORMAT_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"format", "format_version"})
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; expected some of {sorted(names)}")
        kwargs = {k: v for k, v in data.items() if k in names}
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike):
        return cls.from_dict(read_json(path), source=str(path))


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a missing file or bad JSON is a :class:`ConfigError` naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raise :class:`ConfigError` unless ``value`` is an int >= ``minimum`` (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
