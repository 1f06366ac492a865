"""The node classes a prompt can name, grouped by domain. The engine registers this package by name."""
from nodes import (conditioning, conditioning_regions, custom_sampling, image, inpaint, latent, latent_ops, loaders,
                   lora, mask, output, primitives, sampling)

_MODULES = (loaders, lora, conditioning, conditioning_regions, sampling, custom_sampling, latent, latent_ops, inpaint,
            image, mask, output, primitives)

NODE_CLASS_MAPPINGS = {name: cls for module in _MODULES for name, cls in module.NODE_CLASS_MAPPINGS.items()}
NODE_DISPLAY_NAME_MAPPINGS = {name: label for module in _MODULES
                              for name, label in module.NODE_DISPLAY_NAME_MAPPINGS.items()}
