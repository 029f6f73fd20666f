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


class StickyError(RuntimeError):
    """What a GPU raises once it failed for good (a sticky CUDA error): every later call fails alike."""


class FailingDevice(ReferenceBackend):
    """The reference on a device that fails for good after ``healthy_calls`` calls of ``process()``
    in this process (the warm-up's included; None: never): every later call raises
    :class:`StickyError`, as a GPU does after an Xid error, and the backend says it is one."""

    name = "failing-device"
    healthy_calls: int | None = None
    calls = 0

    def process(self, images, config, keep_images=False):
        FailingDevice.calls += 1
        if self.healthy_calls is not None and FailingDevice.calls > self.healthy_calls:
            raise StickyError("cudaErrorIllegalAddress: an illegal memory access was encountered")
        return super().process(images, config, keep_images)

    def close(self) -> None:
        if self.healthy_calls is not None and FailingDevice.calls > self.healthy_calls:
            raise StickyError("cudaErrorIllegalAddress: an illegal memory access was encountered")  # as a sync

    def is_device_failure(self, error: BaseException) -> bool:
        return isinstance(error, StickyError)


def failing_after(calls: int | None) -> None:
    """The :class:`FailingDevice` of this process fails after ``calls`` more calls (None: never)."""
    FailingDevice.calls, FailingDevice.healthy_calls = 0, calls
