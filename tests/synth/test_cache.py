"""The synth cache on disk (loramem.synth.cache): hits, misses, what a key is made of, and files it cannot trust.

tests/synth/conftest.py points cache.synth_dir at an empty folder per test (`synth_cache`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from loramem.corpus import Document, content_id
from loramem.synth import SynthSpec, cache, synthesize
from loramem.synth.pipeline import _cache_key
from loramem.synth.prompts import PROMPT_VERSION

real_synth_dir = cache.synth_dir  # read before the autouse fixture replaces it

KEY = {"text": "0123456789abcdef", "format": "qa", "generator": "fake", "prompts": 1, "count": 2, "seed": 0,
       "temperature": 0.5, "max_retries": 2}
VALUE = {"asked": 2, "pairs": [{"question": "Wer baute den Turm?", "answer": "Gustave Eiffel, 1889 — in Paris"}],
         "dropped_unsupported": 0, "duplicates": 1, "malformed": 0}


def file_for(folder, key: dict):
    """Where a key's value lives: the first 32 hex digits of the SHA-256 of its JSON with sorted keys."""
    return folder / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32] + ".json")


def test_synth_dir_is_inside_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMEM_CACHE", str(tmp_path / "c"))
    assert real_synth_dir() == tmp_path / "c" / "synth"


def test_a_stored_value_is_read_back_from_its_own_file(synth_cache):
    assert cache.load(KEY) is None  # nothing stored yet, not even the folder
    cache.store(KEY, VALUE)
    assert cache.load(KEY) == VALUE
    assert [p.name for p in synth_cache.iterdir()] == [file_for(synth_cache, KEY).name]
    text = file_for(synth_cache, KEY).read_text(encoding="utf-8")
    assert json.loads(text) == {"key": KEY, "value": VALUE}  # the key is stored beside the value
    assert "Gustave Eiffel, 1889 — in Paris" in text  # non-ASCII text as it is, not escaped


def test_storing_again_replaces_the_value(synth_cache):
    cache.store(KEY, VALUE)
    cache.store(KEY, {"asked": 0})
    assert cache.load(KEY) == {"asked": 0}
    assert len(list(synth_cache.iterdir())) == 1


def test_key_order_and_tuples_make_no_difference(synth_cache):
    cache.store(dict(reversed(list(KEY.items()))), VALUE)
    assert cache.load(KEY) == VALUE
    # JSON has no tuples: a key holding one is the key holding the list, stored or asked
    cache.store(KEY | {"formats": ("qa", "summary")}, {"asked": 3})
    assert cache.load(KEY | {"formats": ["qa", "summary"]}) == {"asked": 3}
    assert cache.load(KEY | {"formats": ("qa", "summary")}) == {"asked": 3}
    assert json.loads(file_for(synth_cache, KEY | {"formats": ["qa", "summary"]}).read_text())["key"]["formats"] == [
        "qa", "summary"]


@pytest.mark.parametrize("field, other", [
    ("text", "fedcba9876543210"), ("format", "summary"), ("generator", "openai:m@http://x/v1"), ("prompts", 2),
    ("count", 3), ("seed", 1), ("temperature", 0.0), ("max_retries", 0)])
def test_a_key_differing_in_any_part_is_a_miss(synth_cache, field, other):
    cache.store(KEY, VALUE)
    changed = KEY | {field: other}
    assert file_for(synth_cache, changed) != file_for(synth_cache, KEY)
    assert cache.load(changed) is None
    assert cache.load({k: v for k, v in KEY.items() if k != field}) is None  # and one without that part


def test_a_file_holding_another_key_is_a_miss(synth_cache):
    """A hash collision, or a file copied from elsewhere: the key stored inside decides."""
    synth_cache.mkdir()
    other = KEY | {"seed": 7}
    file_for(synth_cache, KEY).write_text(json.dumps({"key": other, "value": VALUE}))
    assert cache.load(KEY) is None
    file_for(synth_cache, KEY).write_text(json.dumps({"key": KEY, "value": VALUE}))
    assert cache.load(KEY) == VALUE


@pytest.mark.parametrize("content", [
    b"", b"{ half a fi", b"[1, 2, 3]", b'"just a string"', b"null",
    json.dumps({"value": VALUE}).encode(),  # no key
    json.dumps({"key": KEY}).encode(),  # no value
    b"\xff\xfe not UTF-8 \x80",
])
def test_a_damaged_file_is_a_miss_and_is_replaced(synth_cache, content):
    synth_cache.mkdir()
    file_for(synth_cache, KEY).write_bytes(content)
    assert cache.load(KEY) is None
    cache.store(KEY, VALUE)
    assert cache.load(KEY) == VALUE


def test_an_unreadable_path_is_a_miss(synth_cache):
    file_for(synth_cache, KEY).mkdir(parents=True)  # a folder where the file should be
    assert cache.load(KEY) is None


def test_a_failed_store_leaves_no_file_and_keeps_the_old_value(synth_cache):
    cache.store(KEY, VALUE)
    with pytest.raises(TypeError):
        cache.store(KEY, {"pairs": [object()]})  # not JSON: fails halfway through writing
    assert [p.name for p in synth_cache.iterdir()] == [file_for(synth_cache, KEY).name]  # no temporary file left
    assert cache.load(KEY) == VALUE


def test_text_with_a_lone_surrogate_is_stored_and_read_back(synth_cache):
    """JSON replies can hold lone surrogates ("\\ud83d" without its pair), which strict UTF-8 cannot write."""
    value = {"asked": 1, "texts": ["half an emoji: \ud83d"], "malformed": 0}
    cache.store(KEY, value)
    assert cache.load(KEY) == value


# --- the pipeline's keys -------------------------------------------------------------------------


class Named:
    def __init__(self, name: str = "fake", qa_style: str | None = None):
        self.name = name
        if qa_style is not None:
            self.qa_style = qa_style


TEXT = "The Eiffel Tower in Paris was designed by Gustave Eiffel. It was completed in 1889."


def test_the_pipeline_key_holds_everything_that_shapes_a_result():
    spec = SynthSpec()
    assert _cache_key("qa", TEXT, 3, spec, Named()) == {
        "text": content_id(TEXT), "format": "qa", "generator": "fake", "prompts": PROMPT_VERSION, "count": 3,
        "seed": 0, "temperature": 0.5, "max_retries": 2, "refine_rounds": 1, "min_support": 0.5, "style": "lines"}
    assert _cache_key("summary", TEXT, 1, spec, Named("openai:m@u", qa_style="json")) == {
        "text": content_id(TEXT), "format": "summary", "generator": "openai:m@u", "prompts": PROMPT_VERSION,
        "count": 1, "seed": 0, "temperature": 0.5, "max_retries": 2}


SPEC_CHANGES = {"seed": 1, "temperature": 0.0, "max_retries": 0, "refine_rounds": 2, "min_support": 0.25}
QA_ONLY = {"refine_rounds", "min_support"}


@pytest.mark.parametrize("name", ["qa", "summary", "rewrite"])
@pytest.mark.parametrize("field", sorted(SPEC_CHANGES))
def test_each_setting_changes_the_key_of_the_formats_it_shapes(name, field):
    spec = SynthSpec()
    changed = dataclasses.replace(spec, **{field: SPEC_CHANGES[field]})
    shapes = name == "qa" or field not in QA_ONLY
    assert (_cache_key(name, TEXT, 2, changed, Named()) != _cache_key(name, TEXT, 2, spec, Named())) is shapes


@pytest.mark.parametrize("name", ["qa", "summary"])
def test_text_count_generator_and_style_change_the_key(name):
    key = _cache_key(name, TEXT, 2, SynthSpec(), Named())
    assert _cache_key(name, TEXT + " ", 2, SynthSpec(), Named()) != key
    assert _cache_key(name, TEXT, 3, SynthSpec(), Named()) != key
    assert _cache_key(name, TEXT, 2, SynthSpec(), Named("fake-2")) != key
    # the QA reply style shapes only QA
    assert (_cache_key(name, TEXT, 2, SynthSpec(), Named(qa_style="json")) != key) is (name == "qa")


def test_synthesize_hits_only_for_the_same_text_generator_and_settings(fake):
    doc = Document.from_text(TEXT)
    reply = "Q: Who designed the Eiffel Tower? A: Gustave Eiffel"
    generator = fake(lambda prompt: reply)
    spec = SynthSpec(questions=1)
    first, report = synthesize(doc, spec, generator)
    assert generator.calls == 1 and not report.cached
    again, report = synthesize(doc, spec, fake(lambda prompt: "never asked"))  # same name: read from the cache
    assert again == first and report.cached
    for other_doc, other_spec, name in [(Document.from_text(TEXT + " It is tall."), spec, "fake"),
                                        (doc, spec, "fake-2"),
                                        (doc, SynthSpec(questions=1, temperature=0.0), "fake"),
                                        (doc, SynthSpec(questions=1, min_support=0.25), "fake")]:
        other = fake(lambda prompt: reply, name=name)
        _, report = synthesize(other_doc, other_spec, other)
        assert other.calls == 1 and not report.cached
