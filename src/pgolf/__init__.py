"""pgolf: train the best language model that fits a hard byte budget (OpenAI Parameter Golf)."""

__version__ = "0.1.0"
