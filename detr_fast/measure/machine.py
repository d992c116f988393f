"""The machine the numbers come from: the CPU (vendor, family, model, model name, bf16/fp16
hardware, torch's CPU capability) and the device's name, recorded with every measurement."""
import functools
import platform
from typing import Any, Dict, List

import torch

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
FP16_FLAGS = ("avx512_fp16", "amx_fp16")


@functools.lru_cache(maxsize=None)
def cpu_info() -> Dict[str, Any]:
    """The CPU that produced the numbers: vendor, family, model, model name (from /proc/cpuinfo where
    there is one), its bf16 / fp16 instruction flags and torch's CPU capability."""
    info: Dict[str, Any] = {"vendor": None, "family": None, "model": None,
                            "model_name": platform.processor() or platform.machine()}
    flags: List[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "vendor_id" and info["vendor"] is None:
                    info["vendor"] = value
                elif key == "cpu family" and info["family"] is None:
                    info["family"] = value
                elif key == "model" and info["model"] is None:
                    info["model"] = value
                elif key == "model name":
                    info["model_name"] = value
                elif key == "flags" and not flags:
                    flags = value.split()
    except OSError:
        pass
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    info["torch_capability"] = capability() if capability else None
    info["bf16_flags"] = [f for f in BF16_FLAGS if f in flags]
    info["fp16_flags"] = [f for f in FP16_FLAGS if f in flags]
    return info


def cpu_label() -> str:
    """'model name (vendor family F model M; bf16: flags)' for tables and logs."""
    info = cpu_info()
    return (f"{info['model_name']} ({info['vendor']} family {info['family']} model {info['model']}; "
            f"bf16: {','.join(info['bf16_flags']) or 'none'}; torch {info['torch_capability']})")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_info()["model_name"] or "cpu"
