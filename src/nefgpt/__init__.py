"""nefgpt: generate neural fields by predicting their weights token by token with a GPT."""

__version__ = "0.1.0"
