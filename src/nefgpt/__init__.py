"""nefgpt: generate neural fields by predicting their weights token by token with a GPT."""

__version__ = "0.1.0"

# The public API (nefgpt.api), loaded on first use: `import nefgpt` stays cheap, and `python -m nefgpt.cli`
# (torchrun) doesn't import nefgpt.cli through the package before running it as __main__.
_API = ("Fields", "Generator", "load", "load_pretrained")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'nefgpt' has no attribute {name!r}")
