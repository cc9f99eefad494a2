"""ConfigError: its own module so that every config module raises the same error."""


class ConfigError(ValueError):
    """A config field is unknown, missing or contradicts another one."""
