"""Six PhoneBook-style facts shared by tests that write small memories (tiny model, seconds to train)."""

from loramem import facts_from_text

SIX_FACTS = facts_from_text(
    "Question: What is the phone number of Ann Lee? Answer: 603-556-7631\n"
    "Question: What is the phone number of Bo Kim? Answer: 705-882-9365\n"
    "Question: What is the phone number of Cy Ortega? Answer: 212-340-1187\n"
    "Question: What is the phone number of Di Novak? Answer: 319-450-2298\n"
    "Question: What is the phone number of Ed Brandt? Answer: 415-560-3309\n"
    "Question: What is the phone number of Flo Quist? Answer: 509-670-4410\n"
)

# The recipe the tiny-model tests that expect exact recall were written for: every layer, a linear decay to zero, the
# whole-vocabulary softmax. The defaults (layers "auto", a held floor, a candidate softmax) are calibrated on SmolLM2;
# the tiny random model's 64-wide layers hold far less per layer, and its tests train a step or two per epoch.
LINEAR_TO_ZERO = dict(decay_epochs=None, lr_floor=0.0, candidates=0)


def linear_to_zero_flags(epochs: int) -> tuple[str, ...]:
    """LINEAR_TO_ZERO on every layer over `epochs`, as `loramem write` options."""
    return ("--epochs", str(epochs), "--layers", "all", "--decay-epochs", str(epochs), "--lr-floor", "0",
            "--candidates", "0")
