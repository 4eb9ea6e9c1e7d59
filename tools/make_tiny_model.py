#!/usr/bin/env python
"""Make the CPU demo's model: a tiny Qwen2-style model and tokenizer, trained on a verifiable task.

Trains (supervised, on CPU, a few minutes on 2 cores) a small Qwen2 model with a character-level
tokenizer on two-number arithmetic, answered as ``a+b=c\\n#### c``. Training stops once sampled
answers (temperature 1) are right often but not always — the regime where RL has something to
learn — and the model, tokenizer and matching train/eval datasets (GSM8K-like jsonl with
``prompt``/``answer``) are written to ``--out-dir``:

    out-dir/model/        config.json, model.safetensors, tokenizer files (Hugging Face format)
    out-dir/train.jsonl   RL prompts (disjoint from the SFT data)
    out-dir/eval.jsonl    held-out prompts

    python tools/make_tiny_model.py --out-dir runs/tiny
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.rewards import math_reward  # noqa: E402
from pipeline.rollout import LocalEngine, SamplingParams  # noqa: E402
from pipeline.tiny import char_tokenizer  # noqa: E402


def problem(rng: random.Random, max_operand: int) -> tuple[str, str]:
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    op = rng.choice("+-")
    c = a + b if op == "+" else a - b
    return f"{a}{op}{b}=?", str(c)


def solution(question: str, answer: str) -> str:
    return f"{question[:-2]}={answer}\n#### {answer}"


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


def encode(tok, question: str, answer: str | None):
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if answer is None:
        return p_ids, []
    r_ids = tok(solution(question, answer), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p_ids, r_ids


def sampled_accuracy(model, tok, problems, n_samples: int, seed: int) -> float:
    engine = LocalEngine(model, tok, seed=seed)
    prompts = [encode(tok, q, None)[0] for q, _ in problems]
    samples = engine.generate(prompts * n_samples, SamplingParams(max_new_tokens=24, temperature=1.0))
    truths = [a for _, a in problems] * n_samples
    accs = [
        math_reward(tok.decode(s.response_ids, skip_special_tokens=True), t)["acc"]
        for s, t in zip(samples, truths)
    ]
    model.train()
    return sum(accs) / len(accs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--max-operand", type=int, default=99)
    ap.add_argument("--max-steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--target-acc", type=float, default=0.3, help="stop once sampled accuracy reaches this")
    ap.add_argument(
        "--max-acc", type=float, default=0.75, help="refuse a model above this (nothing left for RL)"
    )
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--n-train-prompts", type=int, default=2000)
    ap.add_argument("--n-eval-prompts", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="overwrite an existing --out-dir")
    args = ap.parse_args(argv)

    out = Path(args.out_dir)
    if (out / "model" / "config.json").exists() and not args.force:
        print(f"{out}/model exists; pass --force to remake it")
        return 0
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rng = random.Random(args.seed)
    tok = char_tokenizer()
    model = build_model(len(tok), args.hidden, args.layers, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny Qwen2: {n_params / 1e6:.2f} M parameters, vocab {len(tok)}")

    # Disjoint problem sets: RL train and eval prompts never appear in the supervised data.
    held: dict[str, str] = {}
    while len(held) < args.n_train_prompts + args.n_eval_prompts:
        q, a = problem(rng, args.max_operand)
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
            q, a = problem(rng, args.max_operand)
            if q not in held:
                batch.append(encode(tok, q, a))
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
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
        if step % args.eval_every == 0:
            acc = sampled_accuracy(model, tok, probe, 2, args.seed + step)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
            if acc >= args.target_acc:
                break
    bar.close()
    model.eval()
    final = sampled_accuracy(model, tok, rl_eval, 2, args.seed + 1)
    print(f"supervised warm-up: {step} steps, {time.time() - t0:.0f} s, sampled eval accuracy {final:.3f}")
    if final <= 0.02 or final >= args.max_acc:
        print(
            f"error: eval accuracy {final:.3f} is outside (0.02, {args.max_acc}): RL would have nothing to learn"
        )
        return 1

    (out / "model").mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "model", safe_serialization=True)
    tok.save_pretrained(out / "model")
    for name, items in (("train.jsonl", rl_train), ("eval.jsonl", rl_eval)):
        with open(out / name, "w") as f:
            for q, a in items:
                f.write(json.dumps({"prompt": q, "answer": a}) + "\n")
    (out / "make_tiny_model.json").write_text(
        json.dumps({**vars(args), "steps": step, "eval_accuracy": final, "parameters": n_params}, indent=2)
    )
    print(f"wrote {out}/model, {out}/train.jsonl ({len(rl_train)}), {out}/eval.jsonl ({len(rl_eval)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
