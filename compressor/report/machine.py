"""A description of the machine a run measured on."""

from __future__ import annotations

import os
import platform


def describe_machine() -> dict[str, object]:
    import torch

    info: dict[str, object] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


#: packages `compressor env` reports, by distribution name
PACKAGES = ("compressor", "torch", "transformers", "tokenizers", "onnx", "onnxruntime", "optimum", "optimum-onnx",
            "accelerate", "torch-pruning", "datasets", "optuna", "starlette", "uvicorn", "numpy")
#: CPU feature flags that decide which INT8 / bf16 kernels ONNX Runtime and PyTorch can use
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
             "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile", "neon", "asimd", "asimddp", "sve")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None: not installed), read from metadata without importing it."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def cpu_flags() -> list[str]:
    """The :data:`CPU_FLAGS` this CPU has (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    have: set[str] = set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    have.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        return []
    return [f for f in CPU_FLAGS if f in have]


def describe_environment() -> dict[str, object]:
    """What `compressor env` prints: versions, threads, CPU and its flags, ONNX Runtime providers, GPUs."""
    import torch

    info: dict[str, object] = {"python": platform.python_version(), "platform": platform.platform(),
                               "packages": package_versions()}
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = None
    info["cpu"] = {"model": _cpu_model(), "logical_cores": os.cpu_count(), "physical_cores": physical,
                   "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                   "flags": cpu_flags()}
    info["threads"] = {"torch_intra_op": torch.get_num_threads(), "torch_inter_op": torch.get_num_interop_threads(),
                       **{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}}
    try:
        import onnxruntime as ort

        info["onnxruntime"] = {"providers": ort.get_available_providers(), "device": ort.get_device()}
    except ImportError:
        info["onnxruntime"] = None
    info["gpus"] = [{"name": torch.cuda.get_device_name(i),
                     "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
                    for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return info
