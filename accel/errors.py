"""The two errors every plug-in raises for bad input. Both are ``ValueError``s."""


class UnsupportedModelError(ValueError):
    """The target's model class has no adapter (the message lists the supported ones)."""


class ConfigError(ValueError):
    """A config field, file or combination is invalid (the message names the field and what was expected)."""
