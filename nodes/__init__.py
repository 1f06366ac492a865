"""The node classes a prompt can name, grouped by domain. The engine registers this package by name."""
from nodes import conditioning, image, latent, loaders, output, primitives, sampling

_MODULES = (loaders, conditioning, sampling, latent, image, output, primitives)

NODE_CLASS_MAPPINGS = {name: cls for module in _MODULES for name, cls in module.NODE_CLASS_MAPPINGS.items()}
NODE_DISPLAY_NAME_MAPPINGS = {name: label for module in _MODULES
                              for name, label in module.NODE_DISPLAY_NAME_MAPPINGS.items()}
