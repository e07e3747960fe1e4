"""Synthetic training data from documents: QA pairs, summaries and rewrites written by a generator model.

    examples, report = synthesize(doc, SynthSpec(formats="original+qa"), HFGenerator("smollm2-135m"))
"""

from loramem.synth.formats import FORMATS, parse_formats
from loramem.synth.generators import Generator, HFGenerator, OpenAIGenerator
from loramem.synth.parse import QAPair, parse_pairs, support
from loramem.synth.pipeline import SynthReport, SynthSpec, split_text, synthesize

__all__ = [
    "FORMATS",
    "Generator",
    "HFGenerator",
    "OpenAIGenerator",
    "QAPair",
    "SynthReport",
    "SynthSpec",
    "parse_formats",
    "parse_pairs",
    "split_text",
    "support",
    "synthesize",
]
