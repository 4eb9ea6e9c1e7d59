"""The verbs of one RL step, one module each; `pipeline/train.py` is the loop that calls them.

job = Job(cfg)                  job.py         config, data and checks; then Ray, ranks, engines
samples = generate(job, m)      generate.py    rollout rounds, each scored (score.py), DAPO filter
batch = advantages(job, ...)    advantages.py  the packed batch with advantages over whole groups
batch, old = log_probs(job, ...)  log_probs.py  old (and reference) log-probs and entropies
applied = train(job, ...)       train.py       mini-batches -> optimizer steps (+ entropy dynamics)
sync(job, m)                    sync.py        the engines serve the new weights, checked
evaluate(job, m)                evaluate.py    held-out accuracy, pass@k, entropy
save(job, m) / resume(job)      checkpoint.py  what a restart needs
"""

from pipeline.step.advantages import advantages
from pipeline.step.checkpoint import resume, save
from pipeline.step.evaluate import evaluate
from pipeline.step.generate import generate
from pipeline.step.job import Job
from pipeline.step.log_probs import log_probs
from pipeline.step.sync import sync
from pipeline.step.train import train

__all__ = ["Job", "advantages", "evaluate", "generate", "log_probs", "resume", "save", "sync", "train"]
