"""A module's adapter life cycle: attached to the base model for training (the base restored bit for bit after),
saved as a standard PEFT adapter folder."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from loramem.config import LoraSpec
from loramem.errors import LoramemError


@contextmanager
def attached(model: torch.nn.Module, lora: LoraSpec, seed: int = 0):
    """Wrap a base model with a fresh LoRA adapter; the base comes back bit for bit afterwards.

    PiSSA initialisation rewrites the base weights to a residual, so for it the touched weights are
    kept and put back, and the initial adapter is saved so `save_adapter` can write a plain LoRA
    adapter (rank 2r) that applies to the original base.
    """
    import shutil
    import tempfile

    from peft import get_peft_model

    torch.manual_seed(seed)
    config = lora.to_peft(model.config.num_hidden_layers)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()} if lora.pissa else {}
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as err:
        raise LoramemError(f"cannot build the LoRA module: {str(err).splitlines()[0]}") from None
    initial = None
    if lora.pissa:
        initial = tempfile.mkdtemp(prefix="loramem-pissa-")
        peft_model.peft_config["default"].init_lora_weights = True  # save it as a plain LoRA start point
        peft_model.save_pretrained(initial)
        peft_model.peft_config["default"].init_lora_weights = "pissa"
    peft_model.loramem_initial_adapter = initial
    try:
        yield peft_model
    finally:
        base = peft_model.unload()
        with torch.no_grad():
            for name, p in base.named_parameters():
                if name in snapshot:
                    p.data = snapshot[name]
        if initial:
            shutil.rmtree(initial, ignore_errors=True)


def save_adapter(peft_model, folder) -> None:
    """Save a standard PEFT adapter folder (PiSSA converted to a plain LoRA of the original base)."""
    initial = getattr(peft_model, "loramem_initial_adapter", None)
    extra = {"path_initial_model_for_weight_conversion": initial} if initial else {}
    peft_model.save_pretrained(folder, safe_serialization=True, **extra)
