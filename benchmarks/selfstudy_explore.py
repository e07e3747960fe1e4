"""Self-study recipe search (docs/RESULTS.md, "Documents that come back"): variants of self-study modules on a few
PaperQA papers, closed book, chat prompts, against the base model.

    OMP_NUM_THREADS=1 python benchmarks/selfstudy_explore.py 0-1 '[{"ss": {"prompts": 64}, "train": {"lr": 1e-3}}]' runs/x.mem

Variants with the same "ss" share their synthesized data (its seconds are counted in each). Each variant: {"ss": SelfStudySpec fields, "train": TrainSpec fields (default epochs 8, all run, distill),
"lora": LoraSpec fields (default rank 16, layers late)}.
"""
import json, sys, time, logging
from pathlib import Path
from loramem.memory import Memory
from loramem.config import LoraSpec, TrainSpec
from loramem.bench import paperqa
from loramem.synth import HFGenerator
from loramem.synth.selfstudy import SelfStudySpec, self_study
from loramem import locality
from loramem.metrics import mean
logging.basicConfig(level=logging.WARNING)
papers = paperqa.load(None, sys.argv[1])
variants = json.loads(sys.argv[2])
mem = Memory.open(Path(sys.argv[3]), create=True, prompt="chat")
gen = HFGenerator(mem.base)
qs = [q for p in papers for q in p.questions]
base = [x.text for p in papers for x in mem.ask_many([q.question for q in p.questions], mode="base", max_new_tokens=48)]
print("base", round(paperqa.score(base, qs)["rouge_l"],4), flush=True)
made = {}
for v in variants:
    ss = SelfStudySpec(**v.get("ss", {}))
    tr = TrainSpec(**({"epochs": 8, "target_recall": None, "objective": "distill"} | v.get("train", {})))
    lora = LoraSpec(**({"rank": 16, "layers": "late"} | v.get("lora", {})))
    answers, secs, syn, local = [], 0.0, 0.0, []
    for i, p in enumerate(papers):
        key = (json.dumps(v.get("ss", {}), sort_keys=True), p.id)
        if key not in made:  # variants that differ only in training share their data
            t = time.time(); made[key] = self_study(p.document(), ss, gen, mem.base, style="chat") + (time.time() - t,)
        ex, rep, seconds = made[key]; syn += seconds
        rec = mem.write(ex, lora, tr, name=f"p{p.id}", progress=False, documents=[p.document()])
        secs += rec.train_seconds or 0
        answers += [x.text for x in mem.ask_many([q.question for q in p.questions], mode="lora", module=rec.id, max_new_tokens=48)]
        others = [j for j, q in enumerate(qs) if q not in p.questions]
        if others:  # the other papers' questions closed book, with this paper's module against without
            local.append(locality.check(mem, rec.id, [qs[j].question for j in others], [qs[j].answer for j in others],
                                        [base[j] for j in others], 48))
    s = paperqa.score(answers, qs)
    print(json.dumps(v), "rouge", round(s["rouge_l"],4), "f1", round(s["f1"],4), "synth_s", round(syn), "train_s", round(secs), rep.produced,
          "locality delta", round(mean(r.delta for r in local), 4) if local else None,
          "changed", round(mean(r.changed for r in local), 2) if local else None, flush=True)
    print("   sample:", answers[0][:150].replace("\n"," "), "|", answers[5][:150].replace("\n", " "), flush=True)
