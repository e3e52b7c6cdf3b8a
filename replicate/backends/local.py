"""The single-process backend: every collective is the identity."""

from __future__ import annotations

from replicate.backends.base import Backend


class LocalBackend(Backend):
    """One process; towers on its devices are all there is."""

    name = "local"
