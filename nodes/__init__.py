"""The node classes a prompt can name, grouped by domain. The engine registers this package by name."""
from nodes import image, output, primitives

NODE_CLASS_MAPPINGS = {**image.NODE_CLASS_MAPPINGS, **output.NODE_CLASS_MAPPINGS, **primitives.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS = {
    **image.NODE_DISPLAY_NAME_MAPPINGS,
    **output.NODE_DISPLAY_NAME_MAPPINGS,
    **primitives.NODE_DISPLAY_NAME_MAPPINGS,
}
