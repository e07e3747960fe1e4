"""Training one memory module: examples in, a trained LoRA adapter out.

    pack.py      examples tokenized and laid end to end in rows (a shared prompt prefix once per row)
    forward.py   the decoder over a packed batch, logits only where a label is; frozen layers cached
    score.py     teacher-forced scoring: would greedy decoding reproduce each answer (training's stopping
                 check, and Memory.score on the ask path)
    distill.py   the distillation teacher's targets and loss
    loop.py      the training loop, its learning-rate schedule and its stopping rule
    adapters.py  a fresh adapter attached to the base model (restored bit for bit after), saved for PEFT

The fast path, each trick checked against the plain path in tests/train/:
- packing: a batch's examples are laid end to end in a few rows, with position ids restarting per
  example and a block-diagonal causal mask, so there is no padding waste and no attention across
  examples;
- supervised-only logits: the output projection (a 49K-word vocabulary is ~20% of a small model's
  FLOPs) runs only at positions that carry a label;
- candidate softmax (TrainSpec.candidates, opt-in): the loss normalises over the examples' own label tokens
  plus the base model's top-k tokens at each supervised position instead of the whole vocabulary; the
  check that stops training stays exact over the whole vocabulary, and any token it finds beating an
  answer joins the candidates;
- free recall checks: the training forward already has the argmax at every supervised position, so
  "would greedy decoding reproduce this answer?" is known for every example at no cost; a separate
  no-grad check confirms it before stopping early;
- bf16 autocast only where the hardware multiplies bf16 natively (on an AVX2 CPU without it, bf16
  matmuls are ~50x slower than fp32; measured in benchmarks/speed.py; see precision.py).
"""
