"""Primitive value nodes: a constant of one type, to wire into several inputs at once."""
from __future__ import annotations

import sys


def _primitive(type_name: str, options: dict) -> type:
    class Primitive:
        CATEGORY = "utils/primitive"
        RETURN_TYPES = (type_name,)
        FUNCTION = "execute"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"value": (type_name, dict(options))}}

        def execute(self, value):
            return (value,)

    return Primitive


PrimitiveString = _primitive("STRING", {})
PrimitiveStringMultiline = _primitive("STRING", {"multiline": True})
PrimitiveInt = _primitive("INT", {"min": -sys.maxsize, "max": sys.maxsize, "control_after_generate": True})
PrimitiveFloat = _primitive("FLOAT", {"min": -sys.maxsize, "max": sys.maxsize})
PrimitiveBoolean = _primitive("BOOLEAN", {})

NODE_CLASS_MAPPINGS = {
    "PrimitiveString": PrimitiveString,
    "PrimitiveStringMultiline": PrimitiveStringMultiline,
    "PrimitiveInt": PrimitiveInt,
    "PrimitiveFloat": PrimitiveFloat,
    "PrimitiveBoolean": PrimitiveBoolean,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "PrimitiveString": "String",
    "PrimitiveStringMultiline": "String (Multiline)",
    "PrimitiveInt": "Int",
    "PrimitiveFloat": "Float",
    "PrimitiveBoolean": "Boolean",
}
