"""Typed service configuration, declared once.

Each service declares one dataclass whose fields carry a type, a default and
help text (``field(default, "help")``). CLI flags (``--max-batch-size``) and
environment variables (``LLMESH_<SERVICE>_MAX_BATCH_SIZE``, then
``LLMESH_MAX_BATCH_SIZE``) derive from the fields; precedence is flag >
variable > default. ``validate()`` raises :class:`ConfigError` with a message
naming the field, never ``assert``.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

C = TypeVar("C", bound="BaseConfig")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def field(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors argparse
    """A config field with its help text."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _converter(tp: Any):
    """A function from text to a value of type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        conv = _converter(inner[0])
        return lambda s: None if s.strip().lower() in ("", "none") else conv(s)
    if origin in (list, Sequence, tuple):
        (item,) = typing.get_args(tp)[:1] or (str,)
        conv = _converter(item)
        return lambda s: [conv(x.strip()) for x in s.split(",") if x.strip()]
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        def to_enum(s: str, tp=tp):
            try:
                return tp(s.strip().lower())
            except ValueError:
                choices = ", ".join(m.value for m in tp)
                raise ValueError(f"{s!r} is not one of: {choices}") from None
        return to_enum
    if tp is bool:
        return _parse_bool
    return tp


@dataclasses.dataclass
class BaseConfig:
    """Fields every service has."""

    #: Used for environment variable names: LLMESH_<SERVICE>_<FIELD>.
    SERVICE: typing.ClassVar[str] = ""

    host: str = field("127.0.0.1", "address to listen on")
    port: int = field(0, "port to listen on (0: any free port)")
    instance_id: str = field("", "instance id in load reports (default: service@host:port)")
    grace_period_s: float = field(10.0, "on SIGTERM, seconds running calls get to finish")
    stats_interval_s: float = field(1.0, "default seconds between Stats.Watch reports")
    log_level: str = field("info", "logging level")

    # -- derivation -------------------------------------------------------
    @classmethod
    def _fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.init]

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Adds one flag per field, defaulting to None (so unset flags are visible)."""
        hints = typing.get_type_hints(cls)
        for f in cls._fields():
            tp = hints[f.name]
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = default.value if isinstance(default, enum.Enum) else default
            env = cls.env_names(f.name)[0]
            help_text = f"{f.metadata.get('help', '')} (default: {shown!r}; env {env})"
            parser.add_argument(flag, dest=f.name, type=_converter(tp), default=None, help=help_text)

    @classmethod
    def env_names(cls, name: str) -> list[str]:
        names = []
        if cls.SERVICE:
            names.append(f"LLMESH_{cls.SERVICE.upper()}_{name.upper()}")
        names.append(f"LLMESH_{name.upper()}")
        return names

    @classmethod
    def from_namespace(cls: type[C], ns: argparse.Namespace | Mapping[str, Any] | None = None,
                       env: Mapping[str, str] | None = None) -> C:
        """Builds and validates a config from parsed flags and an environment."""
        env = os.environ if env is None else env
        values = vars(ns) if isinstance(ns, argparse.Namespace) else dict(ns or {})
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for f in cls._fields():
            if values.get(f.name) is not None:
                kwargs[f.name] = values[f.name]
                continue
            for var in cls.env_names(f.name):
                if var in env:
                    try:
                        kwargs[f.name] = _converter(hints[f.name])(env[var])
                    except (TypeError, ValueError) as exc:
                        raise ConfigError(f"{var}: {exc}") from None
                    break
        config = cls(**kwargs)
        config.validate()
        return config

    @classmethod
    def from_args(cls: type[C], argv: Sequence[str] | None = None,
                  env: Mapping[str, str] | None = None, prog: str | None = None) -> C:
        parser = argparse.ArgumentParser(prog=prog, description=cls.__doc__,
                                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        cls.add_arguments(parser)
        return cls.from_namespace(parser.parse_args(argv), env)

    # -- validation -------------------------------------------------------
    def validate(self) -> None:
        """Raises ConfigError naming the first invalid field."""
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: must be in [0, 65535], got {self.port}")
        if self.grace_period_s < 0:
            raise ConfigError(f"grace_period_s: must be >= 0, got {self.grace_period_s}")
        if self.stats_interval_s <= 0:
            raise ConfigError(f"stats_interval_s: must be > 0, got {self.stats_interval_s}")

    def require(self, ok: bool, name: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{name}: {message}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (getattr(self, f.name).value if isinstance(getattr(self, f.name), enum.Enum)
                         else getattr(self, f.name)) for f in self._fields()}
