"""loramem: knowledge stored in LoRA modules of a language model, and read back."""

from loramem.config import AskSpec, LoraSpec, TrainSpec
from loramem.errors import LoramemError
from loramem.corpus import facts_from_file, facts_from_text
from loramem.examples import Example
from loramem.memory import Memory

__all__ = ["AskSpec", "Example", "LoraSpec", "LoramemError", "Memory", "TrainSpec", "facts_from_file", "facts_from_text"]
