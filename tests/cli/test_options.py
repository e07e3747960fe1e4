"""The command line's settings options come from the settings dataclasses: every field everywhere, one declaration."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from loramem.cli import app
from loramem.cli.options import with_settings
from loramem.config import AskSpec, LoraSpec, TrainSpec, settings_fields
from loramem.errors import LoramemError
from loramem.synth import SynthSpec

COMMAND = typer.main.get_command(app)
TRAINING = ["write", "bench phonebook", "bench sectors", "bench paperqa", "bench paperqa-multi", "bench narrativeqa"]


def command(path: str):
    found = COMMAND
    for name in path.split():
        found = found.commands[name]
    return found


def options(path: str) -> dict:
    """The command's options by flag (typer's command objects: its own click)."""
    return {flag: p for p in command(path).params if p.param_type_name == "option" for flag in p.opts}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def expected_flags(cls) -> set[str]:
    fields = [f for f in settings_fields(cls) if f.options.get("cli", True)]
    return {flag(f.options.get("group") or f.name) for f in fields}


@pytest.mark.parametrize("path", TRAINING)
def test_every_command_that_trains_takes_every_lora_and_train_option(path):
    given = options(path)
    assert expected_flags(LoraSpec) | expected_flags(TrainSpec) | {"--precision", "--variants"} <= set(given)
    assert given["--lr"].help == next(f.help for f in settings_fields(TrainSpec) if f.name == "lr")


@pytest.mark.parametrize("path", ["write", "bench paperqa", "bench paperqa-multi"])
def test_commands_that_synthesize_take_every_synth_option(path):
    assert expected_flags(SynthSpec) <= set(options(path))


def test_narrativeqa_keeps_its_own_chunk_tokens():
    # --chunk-tokens there is the size of a story's chunks (its --per chunk), not the generator's prompt chunk.
    assert options("bench narrativeqa")["--chunk-tokens"].default == 256
    assert expected_flags(SynthSpec) - {"--chunk-tokens"} <= set(options("bench narrativeqa"))


def test_defaults_are_the_dataclasses_except_where_a_command_says():
    assert options("write")["--rank"].default == LoraSpec.rank == 4
    assert options("bench paperqa")["--rank"].default == 16
    assert options("bench sectors")["--rank"].help.startswith("rank of each sector's module")
    assert options("ask")["--max-new-tokens"].default == AskSpec.max_new_tokens
    assert expected_flags(AskSpec) <= set(options("ask"))


def test_a_field_shared_by_two_settings_is_one_option_setting_both():
    seen = {}

    @with_settings(TrainSpec, SynthSpec)
    def run(train_spec: TrainSpec = None, synth: SynthSpec = None):
        seen["specs"] = (train_spec, synth)

    cli = typer.Typer()
    cli.command()(run)
    out = CliRunner().invoke(cli, ["--seed", "7", "--target-recall", "0", "--questions", "3"])
    assert out.exit_code == 0, out.output
    train, synth = seen["specs"]
    assert (train.seed, synth.seed, train.target_recall, synth.questions) == (7, 7, None, 3)


def test_variants_are_one_comma_separated_option():
    seen = {}

    @with_settings(LoraSpec)
    def run(lora: LoraSpec = None):
        seen["lora"] = lora

    cli = typer.Typer()
    cli.command()(run)
    assert CliRunner().invoke(cli, ["--variants", "rslora,dora", "--rank", "2"]).exit_code == 0
    assert (seen["lora"].rank, seen["lora"].rslora, seen["lora"].dora, seen["lora"].pissa) == (2, True, True, False)
    out = CliRunner().invoke(cli, ["--variants", "lokr"])
    assert isinstance(out.exception, LoramemError) and "unknown LoRA variant(s) lokr" in str(out.exception)


def test_an_own_option_named_like_a_field_is_refused():
    with pytest.raises(TypeError, match="rank"):
        @with_settings(LoraSpec)
        def run(rank: int = typer.Option(1), lora: LoraSpec = None):
            pass


def test_the_server_requests_have_the_same_fields():
    from loramem.serve import AskOptions, DocumentsRequest

    names = {f.options.get("group") or f.name for cls in (LoraSpec, TrainSpec, SynthSpec)
             for f in settings_fields(cls) if f.options.get("cli", True)}
    assert names <= set(DocumentsRequest.model_fields)
    assert DocumentsRequest.model_fields["lr"].default == TrainSpec.lr
    assert set(AskOptions.model_fields) == {"mode", "router", "top_k", "merge", "base_weight", "router_temperature",
                                            "threshold", "context", "module"}
