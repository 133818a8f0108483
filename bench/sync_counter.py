"""Count what would make the host wait for a GPU, on a CPU (bench/profile_losses.py lists the
calls): SyncCounter, and OpCounter for the aten ops (about one kernel launch each). Imports nothing
of the repository, so that it can count any version of it (bench/profile_train.py --repo)."""

from __future__ import annotations

import collections

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_CALLS = {
    *("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__"),
    *("nonzero", "argwhere", "bincount", "unique", "unique_consecutive", "masked_select", "equal"),
}


class OpCounter(TorchDispatchMode):
    """Every aten op, forward and backward: about one kernel launch each on a GPU."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def _is_device(x) -> bool:
    return isinstance(x, (torch.device, str)) and not isinstance(x, torch.dtype)


class SyncCounter(TorchFunctionMode):
    """The calls that would make the host wait for a GPU. Every tensor is a "device" tensor unless
    it is a host one: made by .cpu() / pin_memory(), by a factory with no device=, or by an op
    whose tensor inputs are all host ones (on a CPU run, both kinds are CPU tensors)."""

    def __init__(self):
        super().__init__()
        self.syncs = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = list(_tensors((args, kwargs)))
        on_device = any(not getattr(t, "_host", False) for t in inputs)
        indexed = list(_tensors(args[1])) if name in ("__getitem__", "__setitem__") else []
        size_from_data = name == "repeat_interleave" and "output_size" not in kwargs
        if on_device and (
            name in SYNC_CALLS
            or (name == "where" and len(args) == 1)
            or (size_from_data and any(isinstance(a, torch.Tensor) for a in args[1:]))
            or any(t.dtype == torch.bool for t in indexed)
        ):
            self.syncs[name.strip("_")] += 1
        elif on_device and name == "__setitem__" and indexed and not torch.is_tensor(args[2]):
            self.syncs["x[index] = scalar (copies it to the device)"] += 1
        to_device = name == "to" and any(_is_device(a) for a in (*args[1:], kwargs.get("device")))
        if name == "to" and inputs and not on_device and to_device:
            if not kwargs.get("non_blocking"):
                self.syncs["blocking host-to-device copy"] += 1
        if func is torch.tensor and kwargs.get("device") is not None:
            self.syncs["blocking host-to-device copy"] += 1
        out = func(*args, **kwargs)
        if name in ("cpu", "pin_memory"):
            host = True
        elif name == "to":
            host = not on_device and not to_device
        elif not inputs:
            host = kwargs.get("device") is None
        else:
            host = not on_device
        if host:
            for t in _tensors(out):
                t._host = True
        return out
