"""Synthetic training data from documents: QA pairs, summaries and rewrites written by a generator model.

    examples, report = synthesize(doc, SynthSpec(formats="original+qa"), HFGenerator("smollm2-135m"))
"""

from loramem.synth.formats import FORMATS, parse_formats
from loramem.synth.generators import GENERATORS, Generator, HFGenerator, OpenAIGenerator, choose_generator
from loramem.synth.parse import QAPair, parse_pairs, support
from loramem.synth.pipeline import SynthReport, SynthSpec, split_text, synthesize

__all__ = [
    "FORMATS",
    "GENERATORS",
    "Generator",
    "HFGenerator",
    "OpenAIGenerator",
    "QAPair",
    "SynthReport",
    "SynthSpec",
    "choose_generator",
    "parse_formats",
    "parse_pairs",
    "split_text",
    "support",
    "synthesize",
]
