#!/usr/bin/env python
"""Make a CPU recipe's model: a tiny Qwen2-style model and tokenizer, warmed up on a verifiable task.

Trains (supervised, on CPU, a few minutes on 2 cores) a small Qwen2 model on one of two tasks and
writes the model, its tokenizer and matching RL prompt sets (jsonl with ``prompt``/``answer``; the
RL prompts never appear in the supervised data) to ``--out-dir``:

    out-dir/model/        config.json, model.safetensors, tokenizer files (Hugging Face format)
    out-dir/train.jsonl   RL prompts
    out-dir/eval.jsonl    held-out prompts
    out-dir/make_tiny_model.json   the options, the warm-up's steps, accuracy and entropy

``--task arithmetic`` (the demo, ``configs/demo_cpu.yaml``): a character tokenizer, two-number
arithmetic answered as ``a+b=c\\n#### c``; training stops once sampled answers (T = 1) are right
often but not always. The answer is unique, so the policy starts almost deterministic.

``--task countdown`` (``configs/collapse_cpu.yaml``): reach a target with four numbers, + and -,
answered as one expression (``13+14-2+9``); a byte-level BPE tokenizer. Every ordering of the terms
is right, and the warm-up shows a uniformly random one, so the policy starts with real uncertainty
(which number first, which next) besides what it has not learnt yet: the entropy GRPO collapses.

    python tools/make_tiny_model.py --out-dir runs/tiny
    python tools/make_tiny_model.py --task countdown --out-dir runs/countdown
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import time
from functools import lru_cache
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.rewards import math_reward  # noqa: E402
from pipeline.rewards.countdown import countdown_reward, ground_truth, parse_ground_truth  # noqa: E402
from pipeline.rollout import LocalEngine, SamplingParams  # noqa: E402
from pipeline.tiny import bpe_tokenizer, char_tokenizer  # noqa: E402


class Arithmetic:
    """``a+b=?`` / ``a-b=?`` with operands up to `max_operand`; one right answer."""

    reward = staticmethod(math_reward)
    defaults = {"hidden": 96, "layers": 3, "max_steps": 4000, "target_acc": 0.3, "max_new_tokens": 24,
                "n_train_prompts": 2000}  # fmt: skip

    def __init__(self, args):
        self.max_operand = args.max_operand

    def tokenizer(self, seed: int):
        return char_tokenizer()

    def problem(self, rng: random.Random) -> tuple[str, str]:
        a, b = rng.randint(0, self.max_operand), rng.randint(0, self.max_operand)
        op = rng.choice("+-")
        c = a + b if op == "+" else a - b
        return f"{a}{op}{b}=?", str(c)

    def solution(self, rng: random.Random, question: str, truth: str) -> str:
        return f"{question[:-2]}={truth}\n#### {truth}"


class Countdown:
    """``Make 38 with 13 14 2 9``: every number once, + and -, answered as one expression.

    The target is drawn uniformly from the values in [1, max_target] that some ordering reaches
    without a negative running value; the warm-up shows a uniformly random one of all the
    expressions that reach it.
    """

    reward = staticmethod(countdown_reward)
    # 20,000 RL prompts: a 200-step run of 16-32 prompts per step sees each at most once or twice
    defaults = {"hidden": 128, "layers": 4, "max_steps": 1500, "target_acc": None, "max_new_tokens": 16,
                "n_train_prompts": 20000}  # fmt: skip

    def __init__(self, args):
        self.n, self.max_number, self.max_target = args.numbers, args.max_number, args.max_target

    def tokenizer(self, seed: int):
        """A byte-level BPE trained on rendered prompts and solutions of its own (seeded) problems."""
        rng = random.Random(seed)
        chat = char_tokenizer()  # same chat template; only renders text here
        corpus = []
        for _ in range(2000):
            question, truth = self.problem(rng)
            corpus.append(render(chat, question) + self.solution(rng, question, truth) + "<|im_end|>\n")
        return bpe_tokenizer(corpus, vocab_size=4096)

    def problem(self, rng: random.Random) -> tuple[str, str]:
        while True:
            numbers = tuple(rng.randint(1, self.max_number) for _ in range(self.n))
            targets = sorted(t for t in expressions(numbers) if 1 <= t <= self.max_target)
            if targets:
                target = rng.choice(targets)
                return f"Make {target} with {' '.join(map(str, numbers))}", ground_truth(
                    list(numbers), target
                )

    def solution(self, rng: random.Random, question: str, truth: str) -> str:
        numbers, target = parse_ground_truth(truth)
        return rng.choice(expressions(tuple(numbers))[target])


@lru_cache(maxsize=65536)
def expressions(numbers: tuple[int, ...]) -> dict[int, list[str]]:
    """{value: sorted expressions}: every ordering of the numbers with + or - between them whose
    running value never goes below 0."""
    out: dict[int, set[str]] = {}
    for order in itertools.permutations(numbers):
        for ops in itertools.product("+-", repeat=len(numbers) - 1):
            value, text = order[0], str(order[0])
            for op, x in zip(ops, order[1:], strict=True):
                value = value + x if op == "+" else value - x
                if value < 0:
                    break
                text += f"{op}{x}"
            else:
                out.setdefault(value, set()).add(text)
    return {v: sorted(e) for v, e in out.items()}


TASKS = {"arithmetic": Arithmetic, "countdown": Countdown}


def build_model(vocab_size: int, hidden: int, layers: int, seed: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    return Qwen2ForCausalLM(cfg)


def render(tok, question: str) -> str:
    return tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def encode(tok, question: str, response: str | None):
    p_ids = tok(render(tok, question), add_special_tokens=False)["input_ids"]
    if response is None:
        return p_ids, []
    return p_ids, tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


@torch.no_grad()
def response_entropy(model, samples) -> float:
    """Mean full-vocabulary entropy (T = 1) of the policy over the sampled responses' tokens."""
    total, count = 0.0, 0
    for lo in range(0, len(samples), 64):
        chunk = samples[lo : lo + 64]
        seqs = [s.prompt_ids + s.response_ids for s in chunk]
        ids = torch.zeros((len(seqs), max(map(len, seqs))), dtype=torch.long)
        att = torch.zeros_like(ids)
        pred = torch.zeros_like(ids, dtype=torch.bool)  # positions that predict a response token
        for i, (s, seq) in enumerate(zip(chunk, seqs, strict=True)):
            ids[i, : len(seq)], att[i, : len(seq)] = torch.tensor(seq), 1
            pred[i, len(s.prompt_ids) - 1 : len(seq) - 1] = True
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits.float(), -1)
        ent = -(logp.exp() * logp).sum(-1)
        total, count = total + float(ent[pred].sum()), count + int(pred.sum())
    return total / max(count, 1)


def sampled_accuracy(model, tok, task, problems, n_samples: int, seed: int, max_new_tokens: int):
    """(accuracy, mean response-token entropy) of `n_samples` samples per problem at T = 1."""
    model.eval()
    engine = LocalEngine(model, tok, seed=seed)
    prompts = [encode(tok, q, None)[0] for q, _ in problems]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0)
    samples = engine.generate(prompts * n_samples, params)
    truths = [a for _, a in problems] * n_samples
    accs = [
        task.reward(tok.decode(s.response_ids, skip_special_tokens=True), t)["acc"]
        for s, t in zip(samples, truths)
    ]
    entropy = response_entropy(model, samples)
    model.train()
    return sum(accs) / len(accs), entropy


def parse_args(argv=None) -> argparse.Namespace:
    """The options, with the task's defaults where none was given."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--task", choices=sorted(TASKS), default="arithmetic")
    ap.add_argument("--hidden", type=int, default=None, help="default: the task's (96 / 128)")
    ap.add_argument("--layers", type=int, default=None, help="default: the task's (3 / 4)")
    ap.add_argument("--max-operand", type=int, default=99, help="arithmetic: operands up to this")
    ap.add_argument("--numbers", type=int, default=4, help="countdown: numbers per puzzle")
    ap.add_argument("--max-number", type=int, default=20, help="countdown: numbers in [1, this]")
    ap.add_argument("--max-target", type=int, default=80, help="countdown: targets in [1, this]")
    ap.add_argument("--max-steps", type=int, default=None, help="default: the task's (4000 / 1500)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument(
        "--target-acc",
        type=float,
        default=None,
        help="stop once sampled accuracy reaches this (default: the task's, 0.3 / never)",
    )
    ap.add_argument("--min-acc", type=float, default=0.02, help="refuse a model at or below this")
    ap.add_argument(
        "--max-acc", type=float, default=0.75, help="refuse a model above this (nothing left for RL)"
    )
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--n-train-prompts", type=int, default=None, help="default: the task's (2000 / 20000)")
    ap.add_argument("--n-eval-prompts", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="overwrite an existing --out-dir")
    args = ap.parse_args(argv)
    for name, value in TASKS[args.task].defaults.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    out = Path(args.out_dir)
    if (out / "model" / "config.json").exists() and not args.force:
        print(f"{out}/model exists; pass --force to remake it")
        return 0
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    task = TASKS[args.task](args)
    rng = random.Random(args.seed)
    tok = task.tokenizer(args.seed + 1)
    model = build_model(len(tok), args.hidden, args.layers, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny Qwen2 for {args.task}: {n_params / 1e6:.2f} M parameters, vocab {len(tok)}")

    # Disjoint problem sets: RL train and eval prompts never appear in the supervised data.
    held: dict[str, str] = {}
    while len(held) < args.n_train_prompts + args.n_eval_prompts:
        q, a = task.problem(rng)
        held[q] = a
    held_items = list(held.items())
    rl_train, rl_eval = held_items[: args.n_train_prompts], held_items[args.n_train_prompts :]
    probe = rl_eval[:64]

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.max_steps, pct_start=0.05
    )
    model.train()
    acc, t0 = 0.0, time.time()
    bar = tqdm(range(1, args.max_steps + 1), desc="supervised warm-up", unit="step")
    for step in bar:
        batch = []
        while len(batch) < args.batch_size:
            q, a = task.problem(rng)
            if q not in held:
                batch.append(encode(tok, q, task.solution(rng, q, a)))
        width = max(len(p) + len(r) for p, r in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        att = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, r) in enumerate(batch):
            seq = torch.tensor(p + r)
            ids[i, : len(seq)] = seq
            att[i, : len(seq)] = 1
            labels[i, len(p) : len(seq)] = torch.tensor(r)  # loss on the response only
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(
            loss=f"{loss.item():.3f}", **({"acc": f"{acc:.2f}"} if args.target_acc is not None else {})
        )
        if step % args.eval_every == 0 and args.target_acc is not None:
            acc, _ = sampled_accuracy(model, tok, task, probe, 2, args.seed + step, args.max_new_tokens)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
            if acc >= args.target_acc:
                break
    bar.close()
    model.eval()
    final, entropy = sampled_accuracy(model, tok, task, rl_eval, 2, args.seed + 1, args.max_new_tokens)
    print(
        f"supervised warm-up: {step} steps, {time.time() - t0:.0f} s, sampled eval accuracy {final:.3f}, "
        f"response entropy {entropy:.3f} nats/token"
    )
    if final <= args.min_acc or final >= args.max_acc:
        print(
            f"error: eval accuracy {final:.3f} is outside ({args.min_acc}, {args.max_acc}): "
            "RL would have nothing to learn"
        )
        return 1

    (out / "model").mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "model", safe_serialization=True)
    tok.save_pretrained(out / "model")
    for name, items in (("train.jsonl", rl_train), ("eval.jsonl", rl_eval)):
        with open(out / name, "w") as f:
            for q, a in items:
                f.write(json.dumps({"prompt": q, "answer": a}) + "\n")
    report = {"steps": step, "eval_accuracy": final, "response_entropy": entropy, "parameters": n_params}
    (out / "make_tiny_model.json").write_text(json.dumps({**vars(args), **report}, indent=2))
    print(f"wrote {out}/model, {out}/train.jsonl ({len(rl_train)}), {out}/eval.jsonl ({len(rl_eval)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
