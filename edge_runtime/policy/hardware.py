"""Hardware probe: GPUs, CPU, RAM and offload disk. Never raises: what it cannot see goes in `notes`.

torch is imported inside `probe()` only, so importing this module stays cheap.
"""

from __future__ import annotations

import os
import platform
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

GIB = 1024 ** 3
# CPU flags worth knowing for inference speed (x86 names from /proc/cpuinfo, ARM "Features").
ISA_HINTS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16",
             "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "bf16")
_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


@dataclass
class GpuInfo:
    index: int
    name: str
    total_bytes: int
    free_bytes: Optional[int]
    compute_capability: Optional[tuple[int, int]]
    bf16_supported: bool  # native bf16 math needs compute capability >= 8.0 (Ampere)
    multiprocessors: Optional[int] = None
    uuid: Optional[str] = None


@dataclass
class CpuInfo:
    model: str
    arch: str
    logical_cores: Optional[int]
    physical_cores: Optional[int]
    usable_cores: Optional[int]  # this process's affinity (containers often allow fewer)
    isa: list[str] = field(default_factory=list)

    @property
    def bf16_native(self) -> bool:
        return bool(_BF16_FLAGS & set(self.isa))


@dataclass
class HardwareInfo:
    gpus: list[GpuInfo]
    cpu: CpuInfo
    ram_total_bytes: Optional[int]
    ram_available_bytes: Optional[int]
    disk_path: str  # where free space was measured (the offload dir or its nearest existing parent)
    disk_free_bytes: Optional[int]
    torch_version: Optional[str] = None
    torch_cuda: Optional[str] = None  # CUDA version torch was built with; None for a CPU build
    driver_version: Optional[str] = None  # from NVML, when nvidia-ml-py is installed
    nvml_gpus: list[str] = field(default_factory=list)  # GPU names the driver sees, even if torch cannot
    notes: list[str] = field(default_factory=list)

    @property
    def gpu(self) -> Optional[GpuInfo]:
        """The GPU the runtime uses (CUDA device 0), if any."""
        return self.gpus[0] if self.gpus else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cpu"]["bf16_native"] = self.cpu.bf16_native
        return data


def _cpu(notes: list[str]) -> CpuInfo:
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model", "Hardware") and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass  # not Linux: platform below still names the CPU
    try:
        import psutil

        logical, physical = psutil.cpu_count(), psutil.cpu_count(logical=False)
    except Exception as exc:  # noqa: BLE001 - psutil can fail in odd sandboxes
        logical, physical = os.cpu_count(), None
        notes.append(f"cpu core count: {exc}")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else logical
    return CpuInfo(model or platform.processor() or platform.machine() or "unknown", platform.machine(),
                   logical, physical, usable, [f for f in ISA_HINTS if f in flags])


def _nvml(info: HardwareInfo) -> dict[str, int]:
    """Driver version and GPU names from NVML; returns free bytes by GPU uuid (no CUDA context)."""
    try:
        import pynvml
    except ImportError:
        return {}
    free: dict[str, int] = {}
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - no driver, or no NVIDIA GPU at all
        if info.gpus:
            info.notes.append(f"NVML unavailable: {exc}")
        return {}
    try:
        version = pynvml.nvmlSystemGetDriverVersion()
        info.driver_version = version.decode() if isinstance(version, bytes) else str(version)
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            info.nvml_gpus.append(name.decode() if isinstance(name, bytes) else str(name))
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
            free[uuid.removeprefix("GPU-")] = int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
    except Exception as exc:  # noqa: BLE001
        info.notes.append(f"NVML query failed: {exc}")
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
    return free


def _gpus(info: HardwareInfo) -> None:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - a broken torch install must not stop `doctor`
        info.notes.append(f"torch not importable: {exc}")
        return
    info.torch_version = torch.__version__
    info.torch_cuda = torch.version.cuda
    try:
        if not torch.cuda.is_available():
            return
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            cc = (int(props.major), int(props.minor))
            uuid = str(getattr(props, "uuid", "") or "").removeprefix("GPU-") or None  # NVML adds "GPU-"
            info.gpus.append(GpuInfo(i, props.name, int(props.total_memory), None, cc, cc >= (8, 0),
                                     getattr(props, "multi_processor_count", None), uuid))
    except Exception as exc:  # noqa: BLE001 - e.g. driver/runtime mismatch
        info.notes.append(f"CUDA query failed: {exc}")


def _free_gpu_memory(info: HardwareInfo, nvml_free: dict[str, int]) -> None:
    """Prefer NVML (no CUDA context); else torch, on device 0 only (the one we will use anyway)."""
    for gpu in info.gpus:
        if gpu.uuid and gpu.uuid in nvml_free:
            gpu.free_bytes = nvml_free[gpu.uuid]
        elif gpu.index == 0:
            try:
                import torch

                gpu.free_bytes = int(torch.cuda.mem_get_info(0)[0])
            except Exception as exc:  # noqa: BLE001
                info.notes.append(f"free memory of GPU 0: {exc}")


def disk_free(path: str | Path) -> tuple[str, Optional[int]]:
    """Free bytes at `path`, measured at its nearest existing parent (it may not exist yet)."""
    path = Path(path).expanduser()
    probe_at = path
    while not probe_at.exists() and probe_at.parent != probe_at:
        probe_at = probe_at.parent
    try:
        return str(path), shutil.disk_usage(probe_at).free
    except OSError:
        return str(path), None


def probe(offload_dir: Optional[str] = None) -> HardwareInfo:
    """Everything the tier selection, dtype policy and planner need to know about this machine."""
    from edge_runtime.paths import offload_dir as default_offload_dir

    notes: list[str] = []
    cpu = _cpu(notes)
    try:
        import psutil

        vm = psutil.virtual_memory()
        ram_total, ram_avail = int(vm.total), int(vm.available)
    except Exception as exc:  # noqa: BLE001
        ram_total = ram_avail = None
        notes.append(f"RAM: {exc}")
    disk_path, free = disk_free(default_offload_dir(offload_dir))
    info = HardwareInfo([], cpu, ram_total, ram_avail, disk_path, free, notes=notes)
    _gpus(info)
    _free_gpu_memory(info, _nvml(info))
    if not info.gpus and info.nvml_gpus:
        build = f"a CPU build (torch {info.torch_version})" if not info.torch_cuda else "unable to use it"
        info.notes.append(f"the driver sees {', '.join(info.nvml_gpus)} but torch is {build}; "
                          "reinstall torch with CUDA (README: Troubleshooting)")
    return info
