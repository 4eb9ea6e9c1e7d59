#!/usr/bin/env python
"""Convert a Megatron-core torch_dist checkpoint to a Hugging Face directory.

    python tools/convert_megatron_to_hf.py --ckpt-dir CKPT --out-dir HF [--force]
                                           [--hf-config-dir DIR] [--shard-size-mb 2048]

Writes model-0000k-of-0000n.safetensors (+ model.safetensors.index.json), config.json and the
tokenizer files, loadable by transformers' AutoModelForCausalLM and by SGLang. Reads one layer at a
time and maps it with the same code as live weight sync (pipeline/actor/export.py). Works on
checkpoints from convert_hf_to_megatron.py (config and tokenizer in CKPT/hf/) and on the actor's own
(pass --hf-config-dir with the original HF directory's config.json and tokenizer files).
Checks first that every .distcp file holds the bytes the checkpoint's index lists, and writes into
a temporary sibling of HF that replaces it only at the end: a failure leaves no partial model, and
HF may not be, contain or lie inside the inputs. Bad input is one line naming the file, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import conversion as cv  # noqa: E402
from pipeline import hf_io  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt-dir", required=True, type=Path)
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("--hf-config-dir", type=Path, default=None, help="default: CKPT/hf")
    p.add_argument("--shard-size-mb", type=int, default=2048)
    p.add_argument("--force", action="store_true", help="replace a non-empty --out-dir")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()

    def run():
        from pipeline.actor.hf_mapping import get_mapping

        cv.check_torch_dist(args.ckpt_dir)  # metadata readable, no truncated .distcp, before writing
        side = args.hf_config_dir or args.ckpt_dir / cv.HF_SUBDIR
        if not (side / "config.json").exists():
            raise cv.ConversionError(
                f"no config.json in {side}; pass --hf-config-dir with the HF model's files"
            )
        hf_config = hf_io.read_config(side)
        get_mapping(hf_config.get("model_type"))
        inputs = {"--ckpt-dir": args.ckpt_dir} | ({"--hf-config-dir": side} if args.hf_config_dir else {})
        cv.check_out_dir(args.out_dir, args.force, inputs)  # every input checked before megatron loads
        from pipeline.actor.export import megatron_to_hf_stream

        t0 = time.perf_counter()
        dtype = cv.stored_dtype(args.ckpt_dir)
        with cv.staged_out_dir(args.out_dir, args.force, inputs) as out:
            named = megatron_to_hf_stream(
                cv.read_torch_dist(args.ckpt_dir, hf_config, progress=not args.no_progress),
                hf_config,
                te=True,
            )
            stats = hf_io.save_hf_shards(
                named,
                out,
                layout=cv.hf_layout(hf_config),
                dtype=dtype,
                shard_bytes=args.shard_size_mb * 1024**2,
            )
            hf_io.copy_side_files(side, out)
            config = json.loads((out / "config.json").read_text())
            config["torch_dtype"] = str(dtype).removeprefix("torch.")
            (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        print(
            f"wrote {args.out_dir}: {stats['tensors']} tensors in {stats['shards']} shard(s), "
            f"{stats['bytes'] / 2**20:.1f} MiB {config['torch_dtype']}, {time.perf_counter() - t0:.1f} s, "
            f"peak RSS {cv.peak_rss_mb():.0f} MiB"
        )

    cv.cli_errors(run)


if __name__ == "__main__":
    main()
