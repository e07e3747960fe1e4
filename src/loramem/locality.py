"""Locality: what a module does to answers that are not about its documents.

A module written from a document should change the answers about that document and nothing else. The check asks
questions unrelated to the module (a small fixed set of general questions shipped here, and in the benchmarks the
other documents' questions) twice, with the base weights and with the module applied, and reports the share of
answers that changed and the change in their ROUGE-L against the references. The figures are recorded in the
module's stats ("locality") and shown by `loramem inspect`. A module that damages unrelated answers is a defect.

    report = check(memory, module_id)                      # the general questions
    report = check(memory, module_id, questions, answers)  # e.g. another document's questions
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from loramem.errors import LoramemError
from loramem.metrics import mean, rouge_l

# Short, stable general-knowledge questions with short answers: the instruct base model answers most of them, so a
# module that breaks general answering shows up as a lower score, and one that leaks its document as changed answers.
GENERAL_QUESTIONS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "Paris"),
    ("How many days are there in a week?", "Seven"),
    ("What color is the sky on a clear day?", "Blue"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("Who wrote Romeo and Juliet?", "William Shakespeare"),
    ("What is the boiling point of water in degrees Celsius?", "100 degrees Celsius"),
    ("What gas do plants absorb from the air?", "Carbon dioxide"),
    ("How many legs does a spider have?", "Eight"),
    ("What is the chemical symbol for gold?", "Au"),
    ("Which ocean is the largest?", "The Pacific Ocean"),
    ("What is the freezing point of water in degrees Fahrenheit?", "32 degrees Fahrenheit"),
    ("What is the square root of 64?", "8"),
    ("What language is spoken in Brazil?", "Portuguese"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("What is the main organ that pumps blood through the body?", "The heart"),
    ("How many continents are there?", "Seven"),
)
MAX_NEW_TOKENS = 32

# General prompts a self-study module is also trained on, with the base model (no document) as their teacher, so
# that it keeps answering what its documents do not cover as the base model does. Kept apart from the questions
# the check asks (tests/test_locality.py): a module is never measured on what anchored it.
ANCHOR_QUESTIONS: tuple[str, ...] = (
    "What is photosynthesis?", "What is a neural network?", "How does a vaccine work?", "What causes the seasons?",
    "What is the speed of light?", "Who was Albert Einstein?", "What is machine learning?",
    "What is the difference between weather and climate?", "How do airplanes fly?", "What is DNA?",
    "What is an algorithm?", "Why is the ocean salty?", "What is inflation in economics?",
    "How does the internet work?", "What is a black hole?", "What is the function of the lungs?",
    "Who invented the telephone?", "What is reinforcement learning?", "What is the theory of evolution?",
    "How is electricity generated?", "What is a prime number?", "What does a compiler do?",
    "What is gravity?", "What is the role of a central bank?", "Why do leaves change color in autumn?",
    "What is a transformer model in machine learning?", "What is the water cycle?", "What is an atom made of?",
    "How do you calculate the area of a circle?", "What is a database?", "What is the greenhouse effect?",
    "What was the Industrial Revolution?", "What is probability?", "How does the heart work?",
    "What is an operating system?", "What is renewable energy?", "What is the Pythagorean theorem?",
    "What is a planet?", "What is statistics used for?", "What is an earthquake?",
    "What is a search algorithm?", "What is supervised learning?", "How do bees make honey?",
    "What is the immune system?", "What is a programming language?", "What is a volcano?",
    "What is optimization in mathematics?", "What is a hypothesis in science?",
)


@dataclass
class LocalityReport:
    questions: int
    changed: float  # share of answers that differ from the base model's
    base_rouge_l: float
    module_rouge_l: float

    @property
    def delta(self) -> float:
        """ROUGE-L with the module minus without it (negative: the module damages these answers)."""
        return self.module_rouge_l - self.base_rouge_l

    def to_dict(self) -> dict:
        return asdict(self) | {"delta": self.delta}


def compare(base_answers: list[str], module_answers: list[str], references: list) -> LocalityReport:
    """The locality figures from answers given without and with the module (references: a string or a list each)."""
    if not references or not len(base_answers) == len(module_answers) == len(references):
        raise LoramemError("locality needs one base answer, one module answer and one reference per question")
    changed = mean(float(b.strip() != m.strip()) for b, m in zip(base_answers, module_answers))
    return LocalityReport(len(references), changed, mean(rouge_l(b, r) for b, r in zip(base_answers, references)),
                          mean(rouge_l(m, r) for m, r in zip(module_answers, references)))


def check(memory, module_id: str, questions: list[str] | None = None, references: list | None = None,
          base_answers: list[str] | None = None, max_new_tokens: int = MAX_NEW_TOKENS) -> LocalityReport:
    """Ask `questions` (default: GENERAL_QUESTIONS) with the base weights (unless `base_answers` are given) and
    with the module, and compare."""
    if questions is None:
        questions, references = [q for q, _ in GENERAL_QUESTIONS], [a for _, a in GENERAL_QUESTIONS]
    if references is None or len(references) != len(questions):
        raise LoramemError("locality needs a reference answer for every question")
    if base_answers is None:
        base_answers = [a.text for a in memory.ask_many(questions, mode="base", max_new_tokens=max_new_tokens)]
    module_answers = [a.text for a in memory.ask_many(questions, mode="lora", module=module_id,
                                                      max_new_tokens=max_new_tokens)]
    return compare(base_answers, module_answers, references)


def record(memory, module_id: str, report: LocalityReport, name: str = "general") -> None:
    """Keep the figures in the module's stats under locality.<name> (shown by `loramem inspect`)."""
    memory.store.update_stats(module_id, {"locality": {name: report.to_dict()}})
