"""Which CUDA errors mean that the GPU failed for good, for both GPU backends (no numba, no CuPy here).

These are "sticky": the CUDA context is unusable afterwards and every later call of the process fails
alike (CUDA's documentation: "the process must be terminated and relaunched"), or the GPU is gone. The
runtime's (cudaError*) and the driver's (CUDA_ERROR_*) codes are the same numbers for all of them.
"""

STICKY_CUDA_ERRORS = frozenset({
    700,  # IllegalAddress
    702,  # LaunchTimeout
    710,  # Assert
    714,  # HardwareStackError
    715,  # IllegalInstruction
    716,  # MisalignedAddress
    717,  # InvalidAddressSpace
    718,  # InvalidPc
    719,  # LaunchFailure (CUDA_ERROR_LAUNCH_FAILED)
    214,  # ECCUncorrectable
    220,  # NvlinkUncorrectable
    46,  # DevicesUnavailable (CUDA_ERROR_DEVICE_UNAVAILABLE)
    100,  # NoDevice
    999,  # Unknown (what a GPU that fell off the bus often gives)
})


def is_sticky(code: object) -> bool:
    """Whether ``code`` (an int, an IntEnum such as numba's CUresult, or None) is a sticky CUDA error."""
    try:
        return int(code) in STICKY_CUDA_ERRORS
    except (TypeError, ValueError):
        return False
