"""Backends by name; `get_backend` is the one place a backend is chosen."""

from __future__ import annotations

from replicate.backends.base import Backend
from replicate.backends.local import LocalBackend

BACKENDS = ("local", "horovod", "collective")


def get_backend(name: str | Backend, **options) -> Backend:
    """Returns the backend called `name` ("local", "horovod" or "collective").

    `get_backend("collective")` must run before TensorFlow starts (see
    `replicate.backends.collective`); call it at the top of the program and
    pass the result to `replicate.replicate(..., backend=...)`.

    Raises:
        ValueError: For an unknown name; the message lists the choices.
        ImportError: For "horovod" where Horovod is not installed.
    """
    if isinstance(name, Backend):
        return name
    if name == "local":
        if options:
            raise ValueError(f"The 'local' backend takes no options. Received: {sorted(options)}")
        return LocalBackend()
    if name == "horovod":
        from replicate.backends.horovod import HorovodBackend

        return HorovodBackend(**options)
    if name == "collective":
        from replicate.backends.collective import CollectiveBackend

        return CollectiveBackend(**options)
    raise ValueError(
        f"Unknown backend. Received: backend={name!r}. Choose one of {list(BACKENDS)}."
    )


__all__ = ["BACKENDS", "Backend", "LocalBackend", "get_backend"]
