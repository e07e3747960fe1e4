"""The LLM judge (loramem.bench.judge): the exact rubric prompt it sends, how it reads a score out of a reply, and a
run over HTTP against a small fake OpenAI-compatible server."""

from __future__ import annotations

import pytest
from fake_openai import FakeServer, chat_reply

from loramem.bench import paperqa
from loramem.bench.judge import Judge, parse_score
from loramem.synth import OpenAIGenerator

# The rubric as the paper words it, written out here rather than read from judge.py.
EXPECTED_PROMPT = """You are grading an answer to a question about a research paper against the reference answer.
Rate the answer from 0 to 10, judging three things together:
- factual alignment: does it state the same facts as the reference, with nothing contradicting it?
- completeness: does it cover every point of the reference?
- relevance: does it answer the question asked, without unrelated content?
0 means wrong or empty, 10 means as good as the reference.

Question: What do Zorblat engines use?
Reference answer: They use quantum gears.
Answer to grade: {answer}

Reply with the score only, a whole number from 0 to 10."""


class Recorder:
    """A generator that answers from a list and keeps what it was asked."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.calls = []

    def complete(self, prompts, max_tokens, temperature, seed):
        self.calls.append((list(prompts), max_tokens, temperature, seed))
        return self.replies[: len(prompts)]


@pytest.mark.parametrize("reply, score", [
    ("7", 7.0), ("10", 10.0), ("0", 0.0), (" 8\n", 8.0),
    ("Score: 6/10", 6.0), ("9 / 10", 9.0), ("10/10", 10.0),
    ("I would give it a 4.", 4.0), ("3. The answer misses the year.", 3.0),
    ("5 out of 10, because 2 facts are missing", 5.0),  # the first number counts
])
def test_a_score_is_the_first_whole_number_from_0_to_10(reply, score):
    assert parse_score(reply) == score


@pytest.mark.parametrize("reply", ["", "   ", "no score", "eleven", "11", "100", "score: high", "x7", "7x"])
def test_a_reply_without_a_score_gives_none(reply):
    assert parse_score(reply) is None


def test_the_judge_sends_the_rubric_with_each_answer_and_reads_the_scores():
    generator = Recorder(["8", "The answer is wrong: 0", "I cannot grade this."])
    judge = Judge(generator, seed=11)
    question, reference = "What do Zorblat engines use?", "They use quantum gears."
    scores = judge.score([question] * 3, [reference] * 3, ["Quantum gears.", "Steam.", ""])
    assert scores == [8.0, 0.0, None]  # None: the reply held no score
    (prompts, max_tokens, temperature, seed), = generator.calls  # one call for all answers, greedy, the judge's seed
    assert (max_tokens, temperature, seed) == (8, 0.0, 11)
    assert prompts == [EXPECTED_PROMPT.format(answer="Quantum gears."), EXPECTED_PROMPT.format(answer="Steam."),
                       EXPECTED_PROMPT.format(answer="(no answer)")]  # an empty answer is named as such


def test_the_default_seed_is_zero():
    generator = Recorder([])
    assert Judge(generator).score([], [], []) == []
    assert generator.calls == [([], 8, 0.0, 0)]


def test_paperqa_means_leave_out_answers_the_judge_could_not_score():
    questions = [paperqa.Question(0, 1, "q1", "Oslo"), paperqa.Question(0, 1, "q2", "Mira Tan"),
                 paperqa.Question(0, 2, "q3", "gears")]
    judge = Judge(Recorder(["9", "no idea", "4/10"]))
    scores = paperqa.score(["Oslo", "Bob", "gears"], questions, judge)
    assert scores["judge"] == (9.0 + 4.0) / 2 and scores["judge_l1"] == 9.0 and scores["judge_l2"] == 4.0


# --- over HTTP -----------------------------------------------------------------------------------


@pytest.fixture
def fake_endpoint():
    """A fake OpenAI-compatible /v1/chat/completions answering each user message from `replies` (by answer text)."""
    replies = {}

    def respond(body):
        return chat_reply(replies[body["messages"][-1]["content"].split("Answer to grade: ")[1].split("\n")[0]])

    server = FakeServer(respond)
    yield server, replies
    server.close()


def test_a_judge_behind_an_openai_compatible_endpoint(fake_endpoint):
    server, replies = fake_endpoint
    replies |= {"Quantum gears.": "10", "Steam.": "Score: 2/10", "(no answer)": "", "Coal.": None}
    judge = Judge(OpenAIGenerator(model="judge-model", base_url=server.url, api_key="sk-judge"), seed=5)
    answers = ["Quantum gears.", "Steam.", "", "Coal."]
    scores = judge.score(["What do Zorblat engines use?"] * 4, ["They use quantum gears."] * 4, answers)
    assert scores == [10.0, 2.0, None, None]  # an empty or null content holds no score
    assert server.paths == ["/v1/chat/completions"] * len(answers)
    assert all(headers["Authorization"] == "Bearer sk-judge" for headers, _ in server.requests)
    bodies = sorted((body for _, body in server.requests), key=lambda body: body["seed"])
    prompts = [EXPECTED_PROMPT.format(answer=a or "(no answer)") for a in answers]
    assert bodies == [{"model": "judge-model", "messages": [{"role": "user", "content": prompt}], "max_tokens": 8,
                       "temperature": 0.0, "seed": 5 + i}  # each prompt its own seed
                      for i, prompt in enumerate(prompts)]
