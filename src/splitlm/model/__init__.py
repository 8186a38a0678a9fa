"""The one model description: ModelSpec, the reference torch module, weight loading.

Torch-free names (ModelSpec, tensor names, the checkpoint cache) import eagerly;
the torch module and loaders import lazily so the device side never pulls torch.
"""

from splitlm.model.spec import ModelSpec, RopeScaling

__all__ = ["ModelSpec", "RopeScaling"]
