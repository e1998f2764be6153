"""Which exceptions mean "bad input or an unusable host" (one line, exit status 2)."""

from __future__ import annotations


class UserError(Exception):
    """Base for errors whose message is meant for the user as it stands."""


def user_error_types() -> tuple[type[BaseException], ...]:
    from .accel.tcg.private_state import TcgUnsupported
    from .arch.x86_64.cpuid import UnknownFeature
    from .bus import BusConflict
    from .config import ConfigError
    from .guests import GuestBuildError
    from .kvm import KvmUnavailable
    from .loader import LoaderError
    from .memory import GuestMemoryError

    return (UserError, ConfigError, LoaderError, KvmUnavailable, TcgUnsupported, GuestBuildError,
            GuestMemoryError, BusConflict, UnknownFeature, OSError)


def user_error_message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
