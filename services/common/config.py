"""Typed service configuration, declared once.

Each service declares one dataclass whose fields carry a type, a default and
help text (``field(default, "help")``). CLI flags (``--max-batch-size``) and
environment variables (``LLMESH_<SERVICE>_MAX_BATCH_SIZE``, then
``LLMESH_MAX_BATCH_SIZE``) derive from the fields; precedence is flag >
variable > default. ``validate()`` raises :class:`ConfigError` with a message
naming the field, never ``assert``; every float field (and every float of a
list field) must be finite, whatever the service (NaN and infinity make no
sense as a duration, a rate, a weight or a bound).

A renamed field keeps its old names for one release:
``field(4, "help", deprecated=("old_name",))`` still accepts ``--old-name``,
``LLMESH_<SERVICE>_OLD_NAME``/``LLMESH_OLD_NAME`` and the key ``old_name``,
below the new names in precedence, and warns (:class:`FutureWarning`, shown
to users by default) each time one is used.
"""

from __future__ import annotations

import argparse
import sys
import dataclasses
import enum
import math
import os
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from services.common.tls import Channels, TlsFiles, is_loopback

C = TypeVar("C", bound="BaseConfig")
_UNSET = object()


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


class LogLevel(str, enum.Enum):
    """A service's logging level: the names :mod:`logging` knows (any case on input)."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"
    CRITICAL = "critical"


def field(default: Any, help: str, deprecated: tuple[str, ...] = (), aliases: tuple[str, ...] = (),  # noqa: A002
          **kw: Any) -> Any:
    """A config field with its help text and the old names it still answers
    to (``deprecated``: former field names, whose flags and variables work
    with a warning; ``aliases``: short flags, e.g. ``("tp",)`` for ``--tp``)."""
    metadata = {"help": help, "deprecated": tuple(deprecated), "aliases": tuple(aliases), **kw}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _warn_deprecated(old: str, new: str) -> None:
    warnings.warn(f"{old} is deprecated and will be removed in the next release; use {new}",
                  FutureWarning, stacklevel=4)


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


def _flag_type(tp: Any):
    """:func:`_converter` for argparse: a closed choice's message (which names the
    choices) becomes the usage error, instead of ``invalid to_enum value``."""
    conv = _converter(tp)
    if not (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        return conv

    def parse(text: str):
        try:
            return conv(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


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
    log_level: LogLevel = field(LogLevel.INFO, "logging level: " + ", ".join(level.value for level in LogLevel))
    # -- transport security (services.common.tls) and the admin boundary (services.common.access) --
    tls_cert: str = field("", "this service's certificate (PEM); with --tls-key and --tls-ca the service serves "
                              "TLS and its calls to other services present it (`llmesh certs` makes a set)")
    tls_key: str = field("", "the private key of --tls-cert (PEM)")
    tls_ca: str = field("", "the CA that signs llmesh services' certificates (PEM): servers and client "
                            "certificates are checked against it")
    tls_client_auth: bool = field(True, "with TLS, require a client certificate signed by --tls-ca (mutual TLS "
                                        "between services)")
    insecure: bool = field(False, "allow plaintext on a --host other than loopback (refused otherwise: give "
                                  "--tls-cert/--tls-key/--tls-ca)")
    admin_token: str = field("", "admin credential: admin RPCs (RegisterInstance, DrainInstance, "
                                 "DeregisterInstance, ScaleTo, SetPolicy, Configure) need `authorization: Bearer "
                                 "<token>` with it or an admin certificate; this service's own admin calls send it "
                                 "(empty: admin RPCs are open on plaintext loopback only, refused elsewhere)")
    admin_token_file: str = field("", "read the admin token from this file instead (a mounted secret; `llmesh "
                                      "certs` writes HOME/certs/admin-token)")
    admin_identities: list[str] = field(["scaler", "cli"], "common names of llmesh certificates that may call "
                                                           "admin RPCs where client certificates are required")

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
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = default.value if isinstance(default, enum.Enum) else default
            env = cls.env_names(f.name)[0]
            help_text = f"{f.metadata.get('help', '')} (default: {shown!r}; env {env})"
            # A bare boolean flag (--no-prefix-cache) means true; --flag false still works.
            bare = {"nargs": "?", "const": True} if tp is bool else {}
            parser.add_argument(_flag(f.name), *map(_flag, f.metadata.get("aliases", ())), dest=f.name,
                                type=_flag_type(tp), default=None, help=help_text, **bare)
            for old in f.metadata.get("deprecated", ()):
                parser.add_argument(_flag(old), dest=old, type=_flag_type(tp), default=None,
                                    help=f"deprecated alias of {_flag(f.name)}")

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
            found = cls._lookup(f, values, env, hints[f.name])
            if found is not _UNSET:
                kwargs[f.name] = found
        config = cls(**kwargs)
        config.validate()
        return config

    @classmethod
    def _lookup(cls, f: dataclasses.Field, values: Mapping[str, Any], env: Mapping[str, str], tp: Any) -> Any:
        """The value given for field ``f`` (``_UNSET``: none given): its flag, then a
        deprecated flag, then its variables, then a deprecated name's variables."""
        old_names = f.metadata.get("deprecated", ())
        if values.get(f.name) is not None:
            return values[f.name]
        for old in old_names:
            if values.get(old) is not None:
                _warn_deprecated(_flag(old), _flag(f.name))
                return values[old]
        for name in (f.name, *old_names):
            for var in cls.env_names(name):
                if var in env:
                    if name != f.name:
                        _warn_deprecated(var, cls.env_names(f.name)[0])
                    try:
                        return _converter(tp)(env[var])
                    except (TypeError, ValueError) as exc:
                        raise ConfigError(f"{var}: {exc}") from None
        return _UNSET

    @classmethod
    def from_args(cls: type[C], argv: Sequence[str] | None = None,
                  env: Mapping[str, str] | None = None, prog: str | None = None) -> C:
        # Each flag's help already says its default and its variable (add_arguments).
        parser = argparse.ArgumentParser(prog=prog, description=cls.__doc__)
        cls.add_arguments(parser)
        return cls.from_namespace(parser.parse_args(argv), env)

    @classmethod
    def from_command_line(cls: type[C], argv: Sequence[str] | None = None, prog: str | None = None) -> C:
        """:meth:`from_args` for a service's ``main``: a value the service
        cannot use (ConfigError) is one line on stderr naming the field and
        exit status 2, as argparse's own usage errors are, not a traceback."""
        try:
            return cls.from_args(argv, prog=prog)
        except ConfigError as exc:
            print(f"{prog or 'llmesh'}: error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    # -- validation -------------------------------------------------------
    def validate(self) -> None:
        """Raises ConfigError naming the first invalid field."""
        self._check_finite()
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: must be in [0, 65535], got {self.port}")
        if self.grace_period_s < 0:
            raise ConfigError(f"grace_period_s: must be >= 0, got {self.grace_period_s}")
        if self.stats_interval_s <= 0:
            raise ConfigError(f"stats_interval_s: must be > 0, got {self.stats_interval_s}")
        self.require(self.admin_token == self.admin_token.strip(), "admin_token",
                     "must not start or end with spaces")
        if self.admin_token_file:
            self.require(not self.admin_token, "admin_token", "give --admin-token or --admin-token-file, not both")
            try:
                self.require(bool(self.admin_secret()), "admin_token_file", "holds no token")
            except OSError as exc:
                raise ConfigError(f"admin_token_file: cannot read {self.admin_token_file}: "
                                  f"{exc.strerror or exc}") from None
        try:
            tls = self.tls()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if tls is not None and (problem := tls.problem()):
            raise ConfigError(problem)
        if tls is None and not self.insecure and not is_loopback(self.host):
            raise ConfigError(f"host: {self.host!r} is reachable from other machines and this service has no TLS; "
                              f"give --tls-cert, --tls-key and --tls-ca (`llmesh certs` makes them), or --insecure "
                              f"to serve plaintext there anyway")

    def admin_secret(self) -> str:
        """The admin token: ``admin_token``, else the first line of ``admin_token_file``
        ("" when neither). OSError when the file cannot be read."""
        if self.admin_token or not self.admin_token_file:
            return self.admin_token
        with open(self.admin_token_file, encoding="utf-8") as f:
            return f.readline().strip()

    def tls(self) -> TlsFiles | None:
        """This service's TLS files (None: plaintext). ValueError when only some are given."""
        return TlsFiles.of(self.tls_cert, self.tls_key, self.tls_ca)

    def channels(self) -> Channels:
        """The factory of this service's client channels (TLS with its certificate when it has one)."""
        return Channels(self.tls())

    def _check_finite(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in self._fields():
            tp, value = hints[f.name], getattr(self, f.name)
            floats = ([value] if tp is float else
                      list(value) if typing.get_args(tp) == (float,) and isinstance(value, (list, tuple)) else [])
            if any(isinstance(v, (int, float)) and not math.isfinite(v) for v in floats):
                raise ConfigError(f"{f.name}: must be a finite number, got {value!r}")

    def require(self, ok: bool, name: str, message: str) -> None:
        if not ok:
            raise ConfigError(f"{name}: {message}, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (getattr(self, f.name).value if isinstance(getattr(self, f.name), enum.Enum)
                         else getattr(self, f.name)) for f in self._fields()}
