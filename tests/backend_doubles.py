"""Test backends shared by the tests of the commands that iterate over the registry."""

from __future__ import annotations

from gpu_pipeline.backends.reference import ReferenceBackend


class NeverAvailable(ReferenceBackend):
    """A backend that cannot run here: commands must list it with its reason."""

    name = "never-available"
    REASON = "needs hardware this machine lacks (test backend)"

    @classmethod
    def unavailable_reason(cls):
        return cls.REASON
