"""Packing: the packed batch reads as the examples would one by one."""

import pytest
import torch
import torch.nn.functional as F

from loramem.config import LoraSpec
from loramem.train.adapters import attached
from loramem.train.forward import supervised_logits
from loramem.train.pack import encode, pack, shared_prefix
from train_reference import EXAMPLES, packed_losses, plain_losses

@pytest.mark.parametrize("loss_on", ["answer", "all"])
@pytest.mark.parametrize("row_tokens", [1, 1024])
def test_packed_supervised_logits_match_plain_path(tiny, loss_on, row_tokens):
    encoded = encode(tiny.tokenizer, EXAMPLES)
    with attached(tiny.model, LoraSpec(rank=2, layers="all")) as model:
        for name, p in model.named_parameters():  # non-zero adapter so the LoRA path matters
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
        with torch.no_grad():
            batch = pack(encoded, loss_on, row_tokens=row_tokens, pad_id=tiny.tokenizer.pad_token_id)
            torch.testing.assert_close(packed_losses(model, batch), plain_losses(model, tiny.tokenizer, encoded, loss_on),
                                       rtol=1e-4, atol=1e-4)


def test_shared_prefix_is_computed_once(tiny):
    encoded = encode(tiny.tokenizer, EXAMPLES)
    n = shared_prefix(encoded)
    assert n == len(tiny.tokenizer("Question: What is the phone number of").input_ids)  # then " Ann", " Bo", " Carla"
    batch = pack(encoded, "answer", pad_id=tiny.tokenizer.pad_token_id)
    assert batch.input_ids.shape == (1, n + sum(len(e.ids) - n for e in encoded))
    assert pack(encoded, "all").input_ids.shape[1] == sum(len(e.ids) for e in encoded)


def test_bf16_autocast_loss_close_to_fp32(tiny):
    encoded = encode(tiny.tokenizer, EXAMPLES)
    batch = pack(encoded, "answer")
    with attached(tiny.model, LoraSpec(rank=2, layers="all")) as model, torch.no_grad():
        fp32 = F.cross_entropy(supervised_logits(model, batch), batch.labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = F.cross_entropy(supervised_logits(model, batch).float(), batch.labels)
    assert abs(fp32.item() - bf16.item()) < 0.05 * fp32.item()
