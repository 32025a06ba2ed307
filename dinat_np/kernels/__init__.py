"""Compute backends behind one contract: ``backend.Backend`` declares every op the models use,
``common`` holds what the backends share, and ``cpu`` / ``cuda`` implement the ops.
The models only orchestrate these ops; they never touch backend arrays directly."""

from .backend import DEVICES, Backend, get_backend
from .common import Conv, Linear, Norm, check_qkv_bias, check_window

__all__ = ["DEVICES", "Backend", "Conv", "Linear", "Norm", "check_qkv_bias", "check_window", "get_backend"]
