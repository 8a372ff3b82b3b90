"""Settings of the service, from the environment: see `config.settings`."""

from config.settings import VARIABLES, ConfigError, Settings, load_settings, redact_dsn

__all__ = ["VARIABLES", "ConfigError", "Settings", "load_settings", "redact_dsn"]
