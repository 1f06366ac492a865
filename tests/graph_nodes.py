"""Test-only nodes for graph tests: constants, arithmetic, list semantics, a slow interruptible node, a failing
node, and an output node that records what it received. `CALLS` counts executions per class."""
from __future__ import annotations

import threading
import time
from collections import Counter

CALLS: Counter[str] = Counter()
RELEASE = threading.Event()  # WaitNode blocks until a test sets this


def _counted(name: str) -> None:
    CALLS[name] += 1


class IntConst:
    CATEGORY = "test"
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0, "min": -100, "max": 100})}}

    def run(self, value):
        _counted("IntConst")
        return (value,)


class Add:
    CATEGORY = "test"
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("INT", {"default": 0}), "b": ("INT", {"default": 0})}}

    def run(self, a, b):
        _counted("Add")
        return (a + b,)


class Collect:
    """Output node: its UI output is the values it received."""
    CATEGORY = "test"
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT",)}, "optional": {"label": ("STRING", {"default": ""})}}

    def run(self, value, label=""):
        _counted("Collect")
        return {"ui": {"values": [value]}}


class Range:
    """OUTPUT_IS_LIST: emits 0..count-1 as a list."""
    CATEGORY = "test"
    RETURN_TYPES = ("INT",)
    OUTPUT_IS_LIST = (True,)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"count": ("INT", {"default": 3, "min": 0, "max": 10})}}

    def run(self, count):
        _counted("Range")
        return (list(range(count)),)


class Sum:
    """INPUT_IS_LIST: receives whole lists."""
    CATEGORY = "test"
    RETURN_TYPES = ("INT",)
    INPUT_IS_LIST = True
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"values": ("INT",)}}

    def run(self, values):
        _counted("Sum")
        return (sum(values),)


class Choice:
    CATEGORY = "test"
    RETURN_TYPES = ("STRING", "FLOAT", "BOOLEAN")
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mode": (["a", "b"],), "ratio": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0}),
                             "flag": ("BOOLEAN", {"default": False}), "text": ("STRING", {"default": ""})}}

    def run(self, mode, ratio, flag, text):
        return (f"{mode}{text}", ratio, flag)


class Volatile:
    """IS_CHANGED returns NaN: never cached."""
    CATEGORY = "test"
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0})}}

    @classmethod
    def IS_CHANGED(cls, value):
        return float("nan")

    def run(self, value):
        _counted("Volatile")
        return (value,)


class Slow:
    """Runs `steps` steps of `delay` seconds, reporting progress and checking the interrupt flag."""
    CATEGORY = "test"
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0}), "steps": ("INT", {"default": 5, "min": 1}),
                             "delay": ("FLOAT", {"default": 0.05, "min": 0.0})},
                "hidden": {"context": "CONTEXT"}}

    def run(self, value, steps, delay, context):
        _counted("Slow")
        for step in range(steps):
            time.sleep(delay)
            context.report_progress(step + 1, steps)
        return (value,)


class Wait:
    """Blocks until RELEASE is set (or 10 s), checking the interrupt flag."""
    CATEGORY = "test"
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0})}, "hidden": {"context": "CONTEXT"}}

    def run(self, value, context):
        _counted("Wait")
        deadline = time.monotonic() + 10
        while not RELEASE.is_set() and time.monotonic() < deadline:
            context.check_interrupted()
            time.sleep(0.01)
        return (value,)


class Fail:
    CATEGORY = "test"
    RETURN_TYPES = ("INT",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"default": 0})}}

    def run(self, value):
        raise ValueError(f"refusing {value}")


NODE_CLASS_MAPPINGS = {
    "TestIntConst": IntConst,
    "TestAdd": Add,
    "TestCollect": Collect,
    "TestRange": Range,
    "TestSum": Sum,
    "TestChoice": Choice,
    "TestVolatile": Volatile,
    "TestSlow": Slow,
    "TestWait": Wait,
    "TestFail": Fail,
}
