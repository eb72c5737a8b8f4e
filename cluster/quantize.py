"""int8 inference: a loaded fp32 model with its Linear layers dynamically quantized, at load time.

The registry keeps the safetensors weights; quantizing happens where a model is loaded to answer
(Serve's engines, jobs.evaluate's scorers), so the accuracy `jobs.evaluate --set quantize=int8`
reports is the accuracy Serve's `quantize: int8` serves. Nothing quantized is ever saved or pickled.

CPU only: PyTorch's dynamic quantization (int8 weights, activations quantized per batch, fbgemm/x86
or qnnpack kernels) is the maintained int8 path PyTorch ships for CPU. It is deprecated in favour
of torchao, which is not in this project's dependencies; the deprecation warnings are silenced here
and the call is in one place to move. On a GPU, int8 needs a kernel library (bitsandbytes, torchao)
that raylm does not install: refused with a message.

GPT-2's attention and MLP layers are transformers' `Conv1D` (a Linear with its weight transposed),
which dynamic quantization does not know: they become `torch.nn.Linear` first, with the same
weights, so those layers are quantized too.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch

Quantize = Literal["none", "int8"]
MODES = ("none", "int8")


def check_mode(mode: str | None, device: torch.device, where: str) -> str:
    """The mode to apply ("none" for None), or a ValueError naming `where` when it cannot run here."""
    mode = mode or "none"
    if mode not in MODES:
        raise ValueError(f"{where}: quantize '{mode}' is not one of {', '.join(MODES)}")
    if mode == "int8" and device.type != "cpu":
        raise ValueError(f"{where}: quantize 'int8' runs on CPU (PyTorch's dynamic int8 kernels); on a {device.type} "
                         "device it needs an int8 kernel library raylm does not install: serve it unquantized "
                         "(bf16 on the GPU), or on CPU replicas (num_gpus: 0)")
    return mode


def linear_from_conv1d(model: torch.nn.Module) -> int:
    """Every transformers `Conv1D` in `model` replaced, in place, by the equivalent nn.Linear; the count."""
    from transformers.pytorch_utils import Conv1D

    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                n_in, n_out = child.weight.shape  # Conv1D computes x @ W + b with W (in, out)
                linear = torch.nn.Linear(n_in, n_out, bias=child.bias is not None, dtype=child.weight.dtype,
                                         device=child.weight.device)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
                swapped += 1
    return swapped


def quantize(model: torch.nn.Module, mode: str | None, device: torch.device, where: str) -> torch.nn.Module:
    """`model` (fp32, eval) as it should answer: itself, or with int8 dynamically quantized Linear layers."""
    if check_mode(mode, device, where) == "none":
        return model
    linear_from_conv1d(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=UserWarning)
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model.float(), {torch.nn.Linear}, dtype=torch.qint8, inplace=False)


def quantized_linears(model: Any) -> int:
    """How many of `model`'s Linear layers compute in int8."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return sum(isinstance(m, DynamicLinear) for m in model.modules())
