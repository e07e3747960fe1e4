import pytest

from loramem.config import LoraSpec, TrainSpec, data_dir
from loramem.errors import LoramemError


@pytest.mark.parametrize("rank", [0, -1, 10**6])
def test_bad_rank_is_refused(rank):
    with pytest.raises(LoramemError, match="rank"):
        LoraSpec(rank=rank)


def test_targets_to_module_names():
    assert LoraSpec(targets="ffn").target_modules() == ["gate_proj", "up_proj", "down_proj"]
    assert LoraSpec(targets="attention").target_modules() == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert len(LoraSpec(targets="all").target_modules()) == 7
    assert LoraSpec(targets="q_proj, down_proj").target_modules() == ["q_proj", "down_proj"]


@pytest.mark.parametrize("layers,expected", [
    ("all", None), ("early", [0, 1, 2]), ("late", [6, 7, 8]), ("2-4", [2, 3, 4]), ("5,1", [1, 5]),
])
def test_layer_selection(layers, expected):
    assert LoraSpec(layers=layers).layer_indices(9) == expected


@pytest.mark.parametrize("layers", ["9", "x", "3-1", "-1"])
def test_bad_layers(layers):
    with pytest.raises(LoramemError, match="layers"):
        LoraSpec(layers=layers).layer_indices(9)


def test_spec_to_peft_config():
    config = LoraSpec(rank=8, alpha=4, targets="ffn", layers="late", rslora=True, pissa=True).to_peft(30)
    assert config.r == 8 and config.lora_alpha == 4 and config.use_rslora is True
    assert set(config.target_modules) == {"gate_proj", "up_proj", "down_proj"}
    assert config.layers_to_transform == list(range(20, 30))
    assert config.init_lora_weights == "pissa"
    assert LoraSpec(rank=4, layers="all").to_peft(30).lora_alpha == 8


def test_spec_builds_adapters_only_where_asked(tiny):
    from loramem.train.adapters import attached

    with attached(tiny.model, LoraSpec(rank=2, targets="ffn", layers="0-1")) as model:
        adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {f"base_model.model.model.layers.{i}.mlp.{m}" for i in (0, 1) for m in ("gate_proj", "up_proj", "down_proj")}


@pytest.mark.parametrize("kw", [dict(lr=0), dict(schedule="step"), dict(loss_on="x"), dict(target_recall=1.5),
                                dict(precision="fp8"), dict(batch_size=0), dict(max_steps=0), dict(candidates=-1),
                                dict(candidates=4, objective="distill"), dict(lr_floor=1.0), dict(decay_epochs=0)])
def test_bad_train_settings(kw):
    with pytest.raises(LoramemError):
        TrainSpec(**kw)


def test_later_settings_at_their_old_defaults_keep_module_ids():
    before = dict(candidates=0, decay_epochs=None, lr_floor=0.0)  # what a module had before the options existed
    for key, value in (("candidates", 32), ("decay_epochs", 10), ("lr_floor", 0.1)):
        assert key not in TrainSpec(**before).to_dict()  # ids of modules written before the option existed stay valid
        assert TrainSpec(**before | {key: value}).to_dict()[key] == value


def test_the_defaults_are_the_fast_recipe_and_candidates_follow_the_objective():
    spec = TrainSpec()
    assert (spec.lr, spec.epochs, spec.decay_epochs, spec.lr_floor, spec.candidates) == (None, 60, 30, 0.1, 32)
    # the rate follows the placement: 1e-2 on up to 4 layers, 5e-3 on more; a given rate is kept
    assert [spec.with_lr_for(n).lr for n in (1, 4, 5, 30)] == [1e-2, 1e-2, 5e-3, 5e-3]
    assert TrainSpec(lr=1e-3).with_lr_for(30).lr == 1e-3 and spec.lr is None
    assert spec.to_dict()["candidates"] == 32
    assert TrainSpec(objective="distill").candidates == 0  # distill keeps the teacher's top k instead
    assert TrainSpec(candidates=0).candidates == 0
    assert LoraSpec().layers == "auto"
    with pytest.raises(LoramemError, match='layers "auto" is resolved from the data'):
        LoraSpec().layer_indices(30)


def test_data_dir_setting(tmp_path, monkeypatch):
    monkeypatch.delenv("LORAMEM_DATA", raising=False)
    assert data_dir() is None
    monkeypatch.setenv("LORAMEM_DATA", str(tmp_path))
    assert data_dir() == tmp_path
    with pytest.raises(LoramemError, match="does not exist"):
        data_dir(tmp_path / "missing")


def test_first_and_last_layer_sets():
    assert LoraSpec(layers="first4").layer_indices(30) == [0, 1, 2, 3]
    assert LoraSpec(layers="last4").layer_indices(18) == [14, 15, 16, 17]
    with pytest.raises(LoramemError, match="has 4 layers"):
        LoraSpec(layers="last5").layer_indices(4)


def test_ask_spec_defaults_and_checks():
    from loramem.config import AskSpec

    assert AskSpec() == AskSpec(mode="lora", router="dense", top_k=None, merge="select", threshold=None,
                                max_new_tokens=24, batch_size=16)
    with pytest.raises(LoramemError, match="unknown mode 'telepathy'"):
        AskSpec(mode="telepathy")
    with pytest.raises(LoramemError, match="unknown merge method 'blend'"):
        AskSpec(merge="blend")
    with pytest.raises(LoramemError, match="max_new_tokens and batch_size must be at least 1"):
        AskSpec(max_new_tokens=0)
