"""A CUDA device's SM clock and energy counter from NVML, the driver's own library, through ctypes (no package to
install): what ``tools.bench`` records around each timed call. A GPU at its power cap runs a step at the clock the
power budget leaves it, so a step's time depends on what ran before it; the clock and the energy show it."""
from __future__ import annotations

import ctypes

import torch

_CLOCK_SM = 1  # nvmlClockType_t NVML_CLOCK_SM


class Meter:
    """``sample() -> (energy in mJ, or None where the GPU has no counter; SM clock in MHz)``."""

    def __init__(self, lib, handle):
        self._lib, self._handle = lib, handle
        self.has_energy = self._energy() is not None

    def _energy(self) -> int | None:
        mj = ctypes.c_ulonglong()
        if self._lib.nvmlDeviceGetTotalEnergyConsumption(self._handle, ctypes.byref(mj)) != 0:
            return None
        return mj.value

    def sample(self) -> tuple[int | None, int]:
        mhz = ctypes.c_uint()
        rc = self._lib.nvmlDeviceGetClockInfo(self._handle, _CLOCK_SM, ctypes.byref(mhz))
        if rc != 0:
            raise RuntimeError(f"NVML: nvmlDeviceGetClockInfo failed with error {rc}")
        return (self._energy() if self.has_energy else None), mhz.value


def meter(device: torch.device | int) -> tuple[Meter | None, str]:
    """A ``Meter`` of CUDA device ``device`` (found by its PCI address: NVML's order may differ from CUDA's), or
    ``(None, why not)``."""
    try:
        lib = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError as e:
        return None, f"no NVML on this machine ({e})"
    rc = lib.nvmlInit_v2()
    if rc != 0:
        return None, f"NVML failed to initialize (error {rc})"
    p = torch.cuda.get_device_properties(device)
    bus = f"{p.pci_domain_id:08X}:{p.pci_bus_id:02X}:{p.pci_device_id:02X}.0".encode()
    handle = ctypes.c_void_p()
    rc = lib.nvmlDeviceGetHandleByPciBusId_v2(ctypes.c_char_p(bus), ctypes.byref(handle))
    if rc != 0:
        return None, f"NVML has no device at PCI address {bus.decode()} (error {rc})"
    m = Meter(lib, handle)
    return m, "" if m.has_energy else "this GPU has no energy counter"
