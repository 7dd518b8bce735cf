"""The mechanism shared by the training forward pass's faster paths (``depthwise``,
``hardtanh``): a torch function mode that hands some recorded calls to an equivalent autograd
function, counts them, and runs every other call unchanged; entered only when asked and when
its environment switch is on."""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

from visiontune import settings


class RoutingMode(TorchFunctionMode):
    """Calls made while gradients are recorded go to ``route``; what it returns (not None) is
    the call's result. ``routed`` counts the calls routed."""

    def __init__(self):
        super().__init__()
        self.routed = 0

    def route(self, func, args: tuple, kwargs: dict):
        """The result of ``func(*args, **kwargs)`` computed another way, or None to run it."""
        raise NotImplementedError

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.is_grad_enabled():
            routed = self.route(func, args, kwargs)
            if routed is not None:
                self.routed += 1
                return routed
        return func(*args, **kwargs)


@contextlib.contextmanager
def switched(mode_type: type[RoutingMode], env_switch: str, active: bool):
    """Within: a ``mode_type`` mode when ``active`` and the environment switch (on by default)
    permit. Yields the mode, or None."""
    if not (active and settings.flag(env_switch)):
        yield None
        return
    with mode_type() as mode:
        yield mode
