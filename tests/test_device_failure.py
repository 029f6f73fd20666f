"""A GPU that fails for good in the middle of a run (an Xid error, an uncorrectable ECC error, a kernel
that hits an illegal address, the GPU falling off the bus): CUDA's errors of that kind are sticky,
every later call fails alike. The run stops as on a full disk, resumable, rather than give every later
image a ``compute`` error record that no resume redoes.

Without a GPU, the engine and the command line are driven by a test double whose device fails after
some calls (:class:`tests.backend_doubles.FailingDevice`); the GPU backends' classification is checked
on the real exception types of numba-cuda and CuPy, built directly.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from gpu_pipeline.backends.base import DeviceFailed
from gpu_pipeline.cli import app
from gpu_pipeline.engine.stream import Engine
from gpu_pipeline.outputs.plan import read_records
from gpu_pipeline.outputs.sink import RecordList
from tests.backend_doubles import FailingDevice, StickyError, failing_after

runner = CliRunner()


@pytest.fixture
def tiles(tmp_path) -> Path:
    folder = tmp_path / "tiles"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for index in range(20):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"tile{index:03d}.png")
    return folder


@pytest.fixture
def failing(register):
    register(FailingDevice)
    yield failing_after
    failing_after(None)


def run(tiles: Path, out: Path, *extra: str):
    return runner.invoke(app, ["run", str(tiles), "--out", str(out), "--backend", "failing-device",
                               "--batch-size", "4", "--workers", "1", *extra])


def test_the_engine_stops_at_a_device_failure_keeping_the_batches_before(tiles, failing):
    failing(2)
    records = RecordList()
    engine = Engine(backend=FailingDevice(), batch_size=4, workers=1, processes=False)
    with pytest.raises(DeviceFailed, match="the GPU of backend failing-device failed: StickyError: "
                                           "cudaErrorIllegalAddress"):
        engine.run(sorted(str(path) for path in tiles.iterdir()), records)
    assert len(records) == 8 and not any("error" in record for record in records)
    # the failed batch is not retried image by image: each retry would fail alike
    assert FailingDevice.calls <= 4


def test_a_device_failure_names_the_first_image_of_its_batch_not_a_file_that_failed_to_decode(tiles, failing):
    failing(0)
    (tiles / "tile000.png").write_bytes(b"")
    engine = Engine(backend=FailingDevice(), batch_size=4, workers=1, processes=False)
    with pytest.raises(DeviceFailed, match=r"\(in the batch of 4 images that starts with "
                                           rf"{re.escape(str(tiles / 'tile001.png'))}\)$"):
        engine.run(sorted(str(path) for path in tiles.iterdir()), RecordList())


def test_a_device_failure_ends_the_run_resumably_with_exit_4(tiles, tmp_path, failing):
    """Every image after the failure got its own compute error record, the run went on at full speed,
    exit 1, and no resume redid them (only --retry-failed): tens of thousands of permanent errors."""
    out = tmp_path / "out.jsonl"
    failing(3)  # the warm-up and two batches of 4
    result = run(tiles, out)
    assert result.exit_code == 4, result.output
    assert "Traceback" not in result.output and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr == (
        "gpu-pipeline: error: the GPU of backend failing-device failed: StickyError: cudaErrorIllegalAddress: an "
        f"illegal memory access was encountered (in the batch of 4 images that starts with {tiles / 'tile008.png'}); "
        "the records written before are kept: run the same command again to resume once the GPU works\n")
    kept = read_records(out)
    assert len(kept) == 8 and not any("error" in record for record in kept)
    failing(None)  # the GPU back (a reboot, another node)
    resumed = run(tiles, out, "-q")
    assert resumed.exit_code == 0, resumed.output
    clean = tmp_path / "clean.jsonl"
    assert run(tiles, clean, "-q").exit_code == 0
    assert out.read_bytes() == clean.read_bytes()


def test_a_device_that_fails_at_the_warm_up_ends_the_run_alike(tiles, tmp_path, failing, monkeypatch):
    out = tmp_path / "out.jsonl"
    failing(0)
    closed, close = [], FailingDevice.close
    monkeypatch.setattr(FailingDevice, "close", lambda self: closed.append(self) or close(self))
    result = run(tiles, out)
    assert result.exit_code == 4, result.output
    assert len(closed) == 1  # closed as after a run (its close raises the GPU's error: not shown)
    assert result.stderr.startswith("gpu-pipeline: error: the GPU of backend failing-device failed: ")
    assert len(result.stderr.splitlines()) == 1 and read_records(out) == []
    failing(None)
    assert run(tiles, out, "-q").exit_code == 0 and len(read_records(out)) == 20


def test_to_standard_output_a_device_failure_says_so_without_a_resume(tiles, failing):
    failing(2)
    result = runner.invoke(app, ["run", str(tiles), "--out", "-", "--backend", "failing-device",
                                 "--batch-size", "4", "--workers", "1", "-q"])
    assert result.exit_code == 4
    assert result.stderr == ("gpu-pipeline: error: the GPU of backend failing-device failed: StickyError: "
                             "cudaErrorIllegalAddress: an illegal memory access was encountered (in the batch of 4 "
                             f"images that starts with {tiles / 'tile004.png'})\n")
    assert len(result.stdout.splitlines()) == 4  # the first batch (the warm-up took a call)


def test_a_bad_image_is_still_its_own_error_record(tiles, tmp_path, failing):
    failing(None)
    (tiles / "tile005.png").write_bytes(b"not a png")
    out = tmp_path / "out.jsonl"
    result = run(tiles, out, "-q")
    assert result.exit_code == 1
    errors = [record for record in read_records(out) if "error" in record]
    assert [Path(record["path"]).name for record in errors] == ["tile005.png"]


def test_the_python_api_raises_device_failed(tiles, failing):
    import gpu_pipeline
    from gpu_pipeline import api

    api._forget_backends()
    failing(0)  # (the 20 tiles are one batch of a CPU backend: the engine test has batches before)
    records = []
    with pytest.raises(DeviceFailed, match="the GPU of backend failing-device failed"):
        for record in gpu_pipeline.run(str(tiles), backend="failing-device", workers=1, decode="threads"):
            records.append(record)
    assert records == []  # it yielded an error record for each
    with pytest.raises(DeviceFailed, match="the GPU of backend failing-device failed"):
        gpu_pipeline.process([np.zeros((8, 8), np.uint8)], backend="failing-device")
    assert gpu_pipeline.DeviceFailed is DeviceFailed
    api._forget_backends()


def test_process_raises_device_failed_when_the_gpu_fails_between_two_calls(failing):
    """A notebook's GPU that fails for good after the backend started: DeviceFailed, as run raises,
    not the CUDA error of whichever backend it is (the test above fails in the warm-up)."""
    import gpu_pipeline
    from gpu_pipeline import api

    api._forget_backends()
    failing(2)  # the warm-up and the first call
    images = [np.full((8, 8), 7, np.uint8)]
    assert gpu_pipeline.process(images, backend="failing-device").histograms[0, 7] == 64
    with pytest.raises(DeviceFailed, match="^the GPU of backend failing-device failed: StickyError: "
                                           "cudaErrorIllegalAddress") as raised:
        gpu_pipeline.process(images, backend="failing-device")
    assert isinstance(raised.value.__cause__, StickyError)
    failing(None)
    api._forget_backends()


# ---------------------------------------------------------------- which errors are device failures


#: Sticky CUDA errors (the CUDA runtime's and driver's codes agree on these): the context is unusable and
#: every later call fails alike, "the process must be terminated and relaunched" (cudaErrorIllegalAddress,
#: LaunchTimeout, Assert, HardwareStackError, IllegalInstruction, MisalignedAddress, InvalidAddressSpace,
#: InvalidPc, LaunchFailure), or the GPU is gone (ECCUncorrectable, NvlinkUncorrectable, DevicesUnavailable,
#: NoDevice, Unknown).
STICKY = [700, 702, 710, 714, 715, 716, 717, 718, 719, 214, 220, 46, 100, 999]
#: Not the device: out of memory (per batch, re-planned), an invalid value, a launch too large.
NOT_STICKY = [2, 1, 701, 98]


def numba_cuda_backend():
    from gpu_pipeline.backends.numba_cuda import NumbaCudaBackend

    return object.__new__(NumbaCudaBackend)  # (no GPU here: the classification needs none)


def cupy_backend():
    from gpu_pipeline.backends.cupy_gpu import CupyBackend

    return object.__new__(CupyBackend)


def driver_error(status: int):
    """CuPy's CUDADriverError: its constructor asks libcuda for the message, absent without a GPU."""
    from cupy_backends.cuda.api.driver import CUDADriverError

    error = CUDADriverError.__new__(CUDADriverError)
    error.status = status
    return error


@pytest.mark.parametrize("code", STICKY)
def test_sticky_cuda_errors_are_device_failures(code):
    pytest.importorskip("numba.cuda")
    from numba.cuda.cudadrv.driver import CudaAPIError

    assert numba_cuda_backend().is_device_failure(CudaAPIError(code, "Call to cuMemcpyDtoH results in ..."))
    cupy_backends = pytest.importorskip("cupy_backends.cuda.api.runtime")
    assert cupy_backend().is_device_failure(cupy_backends.CUDARuntimeError(code))
    assert cupy_backend().is_device_failure(driver_error(code))


@pytest.mark.parametrize("code", NOT_STICKY)
def test_other_cuda_errors_are_not(code):
    pytest.importorskip("numba.cuda")
    from numba.cuda.cudadrv.driver import CudaAPIError

    assert not numba_cuda_backend().is_device_failure(CudaAPIError(code, "..."))
    cupy_backends = pytest.importorskip("cupy_backends.cuda.api.runtime")
    assert not cupy_backend().is_device_failure(cupy_backends.CUDARuntimeError(code))
    assert not cupy_backend().is_device_failure(driver_error(code))


def test_out_of_memory_and_bad_images_are_not_device_failures():
    from gpu_pipeline.backends import _cuda_plan, cupy_gpu
    from gpu_pipeline.backends.reference import ReferenceBackend

    for backend in (numba_cuda_backend(), cupy_backend()):
        for error in (_cuda_plan.GpuOutOfMemory("one image needs 3 GiB"), cupy_gpu.GpuOutOfMemory("pinned"),
                      ValueError("expected a uint8 array"), MemoryError(), StickyError("x")):
            assert not backend.is_device_failure(error), (backend, error)
    from numba.cuda.cudadrv.driver import CudaAPIError

    assert not ReferenceBackend().is_device_failure(CudaAPIError(700, "a CPU backend has no device"))


def test_cupys_pinned_allocation_is_out_of_memory_only_when_memory_ran_out():
    """Every CUDARuntimeError of cudaHostAlloc was taken for out of memory: a GPU that failed there was
    re-planned down to one image a batch, then each image got a GpuOutOfMemory record."""
    runtime = pytest.importorskip("cupy_backends.cuda.api.runtime")
    from gpu_pipeline.backends.cupy_gpu import CupyDevice, GpuOutOfMemory

    class Pinned:
        def __init__(self, status):
            self.status = status

        def empty_pinned(self, shape, dtype):
            raise runtime.CUDARuntimeError(self.status)

    device = object.__new__(CupyDevice)
    device._runtime = runtime
    device._cupyx = Pinned(2)  # cudaErrorMemoryAllocation
    with pytest.raises(GpuOutOfMemory):
        device.alloc_pinned(1024)
    device._cupyx = Pinned(700)
    with pytest.raises(runtime.CUDARuntimeError) as raised:
        device.alloc_pinned(1024)
    assert cupy_backend().is_device_failure(raised.value)


class _FailsAsItTakesTheModel(FailingDevice):
    """A GPU that fails as the label model's weights are copied to it (cupy with --model eurosat-cnn)."""

    def attach_label_model(self, model) -> bool:
        raise StickyError("cudaErrorIllegalAddress: an illegal memory access was encountered")


def test_a_gpu_that_fails_as_it_takes_the_label_model_could_not_start(tiles, tmp_path, register):
    """A traceback before: the failure came from attach_label_model, where nothing classified it."""
    register(_FailsAsItTakesTheModel)
    failing_after(None)
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["run", str(tiles), "--out", str(out), "--backend", "failing-device",
                                 "--model", "eurosat-cnn"])
    assert result.exit_code == 2, result.output
    assert result.stderr == ("gpu-pipeline: error: backend 'failing-device' could not start: StickyError: "
                             "cudaErrorIllegalAddress: an illegal memory access was encountered\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiles"]  # a refusal writes nothing
    verified = runner.invoke(app, ["verify", str(tiles), "--backends", "failing-device,numba",
                                   "--model", "eurosat-cnn"])
    assert verified.exit_code == 1, verified.output
    assert "failing-device" in verified.stdout and "could not start: StickyError" in verified.stdout
    assert "Traceback" not in verified.output


def test_a_device_failure_names_the_batchs_first_image_not_a_file_that_did_not_decode(tiles, failing):
    """nightly.md: the failure names "the first file of the batch it was computing"; a batch that starts
    with a file that did not decode (its error record rides along) was not computing that one."""
    failing(0)
    paths = sorted(str(path) for path in tiles.iterdir())
    Path(paths[0]).write_bytes(b"")
    engine = Engine(backend=FailingDevice(), batch_size=4, workers=1, processes=False)
    with pytest.raises(DeviceFailed, match=rf"\(in the batch of 4 images that starts with {re.escape(paths[1])}\)$"):
        engine.run(paths, RecordList())


def test_a_device_failure_in_the_label_step_stops_the_run_naming_the_batch(tiles, failing):
    """The label model may run on the device (the CNN with cupy): its sticky error is the GPU's too."""
    failing(None)

    def labels_on_a_failed_device(images, histograms, edge_counts, *features):
        raise StickyError("cudaErrorIllegalAddress: an illegal memory access was encountered")

    records = RecordList()
    engine = Engine(backend=FailingDevice(), batch_size=4, workers=1, processes=False,
                    labels_of=labels_on_a_failed_device)
    paths = sorted(str(path) for path in tiles.iterdir())
    with pytest.raises(DeviceFailed, match=r"the GPU of backend failing-device failed: StickyError: .* \(in the "
                                           rf"batch of 4 images that starts with {re.escape(paths[0])}\)$"):
        engine.run(paths, records)
    assert len(records) == 0
