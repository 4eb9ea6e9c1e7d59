#!/usr/bin/env python
"""Convert a Hugging Face model directory to a Megatron-core torch_dist checkpoint.

    python tools/convert_hf_to_megatron.py --hf-dir HF --out-dir CKPT [--tp N --pp M --dtype bf16]
                                           [--force] [--verify]

Streams one tensor at a time (peak memory about one layer plus the largest tensor; printed at the
end). Writes into a temporary sibling of CKPT that replaces it only at the end: a failure or Ctrl-C
leaves no partial checkpoint, and CKPT may not be, contain or lie inside HF. Bad input (a truncated
or corrupt file, weights that do not match config.json) is one line naming the file, exit status 2. The checkpoint stores global shapes, so it loads at any TP/PP (`--tp` sets the vocab padding,
`--tp/--pp` are checked against the model). Only the model is stored (no optimizer state); the
HF config and tokenizer files are copied to CKPT/hf/ for the way back (convert_megatron_to_hf.py).
`--verify` then loads the checkpoint into a Megatron model (TP1, this process), compares its logits
on a few prompts with transformers' and checks that the export back to HF is bit-exact.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline import conversion as cv  # noqa: E402
from pipeline import hf_io  # noqa: E402


def verify(hf_dir: Path, ckpt: Path, hf_config: dict) -> dict:
    """Max |logit difference| HF vs converted Megatron on a few prompts, and the round trip."""
    import transformers

    from pipeline.actor.config import ActorConfig
    from pipeline.actor.export import export_hf_weights
    from pipeline.actor.model import build_model

    cv.init_single_process()
    chunks = build_model(hf_config, ActorConfig(dtype="float32"))
    cv.load_model_checkpoint(chunks, ckpt)
    model = chunks[0].eval()
    vocab = hf_config["vocab_size"]
    prompts = _prompts(hf_dir, vocab)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    worst = 0.0
    with torch.no_grad():
        for ids in prompts:
            ids = ids[None]
            pos = torch.arange(ids.shape[1])[None]
            ours = model(ids, pos, None)[..., :vocab].float()
            ref = hf_model(input_ids=ids).logits.float()
            worst = max(worst, (ours - ref).abs().max().item())
    hf = hf_io.HFWeights(hf_dir)
    stored = cv.stored_dtype(ckpt)
    mismatched = [n for n, t in export_hf_weights(chunks, hf_config) if not torch.equal(t, hf[n].to(stored))]
    return {"max_logit_diff": worst, "prompts": len(prompts), "round_trip_mismatched": mismatched}


def _prompts(hf_dir: Path, vocab: int) -> list[torch.Tensor]:
    texts = ["The capital of France is", "def fibonacci(n):", "1 + 1 = 2, 2 + 2 ="]
    try:
        import transformers

        tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
        out = [torch.tensor(tok(t)["input_ids"]) for t in texts]
        if all(len(x) > 1 and int(x.max()) < vocab for x in out):
            return out
    except Exception:  # no (usable) tokenizer: random token ids
        pass
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (n,), generator=g) for n in (7, 16, 31)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", required=True, type=Path)
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("--tp", type=int, default=1, help="target TP: sets the vocab padding (128 x tp)")
    p.add_argument("--pp", type=int, default=1, help="target PP: checked against the layer count")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: the HF weights' dtype")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out-dir")
    p.add_argument("--verify", action="store_true", help="compare logits with transformers afterwards")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()

    def run():
        from pipeline.actor.config import ActorConfig, check_layout
        from pipeline.actor.hf_mapping import get_mapping
        from pipeline.config import ConfigError

        hf_config = hf_io.read_config(args.hf_dir)
        get_mapping(hf_config.get("model_type"))  # unknown architecture: fail before anything else
        try:
            check_layout(ActorConfig(tp=args.tp, pp=args.pp), hf_config, args.tp * args.pp)
        except ConfigError as e:
            raise cv.ConversionError(str(e)) from None
        cv.check_hf(hf_io.HFWeights(args.hf_dir), hf_config)  # missing/partial shards, names, shapes first
        t0 = time.perf_counter()
        with cv.staged_out_dir(args.out_dir, args.force, {"--hf-dir": args.hf_dir}) as out:
            summary = cv.hf_to_torch_dist(
                args.hf_dir, out, tp=args.tp, dtype=args.dtype, progress=not args.no_progress
            )
            if args.verify:  # before the output is put in place: a failed check leaves nothing
                r = verify(args.hf_dir, out, hf_config)
                print(
                    f"verify: max |logit HF - Megatron| = {r['max_logit_diff']:.3e} over {r['prompts']} prompts"
                )
                bad = r["round_trip_mismatched"]
                print(
                    "verify: HF -> Megatron -> HF " + ("bit-exact" if not bad else f"MISMATCH in {bad[:5]}")
                )
                if bad:
                    raise cv.ConversionError(
                        f"the round trip differs in {len(bad)} tensor(s); nothing written"
                    )
        print(
            f"wrote {args.out_dir}: {summary['tensors']} tensors, dtype {summary['dtype']}, padded vocab "
            f"{summary['padded_vocab']}, {time.perf_counter() - t0:.1f} s, peak RSS {cv.peak_rss_mb():.0f} MiB"
        )

    cv.cli_errors(run)


if __name__ == "__main__":
    main()
