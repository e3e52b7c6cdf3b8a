"""replicate: data-parallel training of Keras models on TensorFlow, over GPUs and machines."""

from replicate.backends import Backend, get_backend
from replicate.builder import ReplicaBuilder
from replicate.devices import list_devices, simulate_devices
from replicate.model import ReplicatedModel, replicate

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "ReplicaBuilder",
    "ReplicatedModel",
    "__version__",
    "get_backend",
    "list_devices",
    "replicate",
    "simulate_devices",
]
