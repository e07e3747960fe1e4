"""loramem: knowledge stored in LoRA modules of a language model, and read back."""

from loramem.config import AskSpec, LoraSpec, TrainSpec
from loramem.errors import LoramemError
from loramem.memory import Memory, facts_from_file, facts_from_text
from loramem.train import Example

__all__ = ["AskSpec", "Example", "LoraSpec", "LoramemError", "Memory", "TrainSpec", "facts_from_file", "facts_from_text"]
