"""The rows of `loramem bench self-study` for modules already written, printed one by one (most telling first):
for a machine too busy to wait for the whole study. Writes the same modules (a committed one is reused).

    OMP_NUM_THREADS=1 python benchmarks/selfstudy_rows.py --papers 0-2 --prompts 64 --memory runs/ss-pq.mem
"""
import argparse
import json
import time

from loramem import locality
from loramem.bench import paperqa, sibling_memory
from loramem.bench import selfstudy as study
from loramem.config import LoraSpec, TrainSpec
from loramem.memory import Memory
from loramem.synth import HFGenerator, SynthSpec, selfstudy

parser = argparse.ArgumentParser()
parser.add_argument("--papers", default="0-2")
parser.add_argument("--prompts", type=int, default=64)
parser.add_argument("--memory", required=True)
args = parser.parse_args()
items = study.paperqa_items(paperqa.load(None, args.papers))
memory = Memory.open(args.memory, create=True, prompt="chat")
target = sibling_memory(memory, "self-study")
lora = LoraSpec(rank=16, layers="late")
train = TrainSpec(lr=selfstudy.TRAIN_LR, epochs=selfstudy.TRAIN_EPOCHS, target_recall=None, candidates=0)
written = study._write(target, items, "self-study", SynthSpec(), selfstudy.SelfStudySpec(prompts=args.prompts),
                       HFGenerator(memory.base), lora, train, False)
refs = [r for it in items for r in it.references]
questions = [q for it in items for q in it.questions]
started = time.perf_counter()


def show(setting, answers, **extra):
    row = {"setting": setting, "rouge_l": round(study._score(answers, refs), 4),
           "per_document": [round(study._score(answers[i * 30:(i + 1) * 30], refs[i * 30:(i + 1) * 30]), 4)
                            for i in range(len(items))]} | extra
    print(json.dumps(row), f"({time.perf_counter() - started:.0f} s)", flush=True)


print(json.dumps({"modules": [{k: w[k] for k in ("module", "examples", "synth_s", "synth_cached", "train_s",
                                                  "doc_tokens")} for w in written]}), flush=True)
base = [a.text for a in memory.ask_many(questions, mode="base", max_new_tokens=48)]
show("base", base)
show("self-study closed book", study._module_answers(target, items, written, "lora", base, 48))
general = [a.text for a in memory.ask_many([q for q, _ in locality.GENERAL_QUESTIONS], mode="base",
                                           max_new_tokens=locality.MAX_NEW_TOKENS)]
print(json.dumps(study._locality(target, items, written, base, general, 30, 48)), flush=True)
show("self-study + rag", study._module_answers(target, items, written, "lora+rag", base, 48))
show("rag", [a.text for a in target.ask_many(questions, mode="rag", max_new_tokens=48)])
show("icl", [a for it in items for a in [x.text for x in memory.ask_many(
    list(it.questions), mode="icl", context=it.doc.text, max_new_tokens=48)]])
show("self-study + icl", study._module_answers(target, items, written, "lora+icl", base, 48))
