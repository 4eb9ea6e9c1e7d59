"""Compile the vocab-parallel op's Triton kernels ahead of time for NVIDIA GPUs, without a GPU.

    .venv/bin/python tools/compile_vocab_parallel_kernels.py                 # sm_80 and sm_90, V_local 19008
    .venv/bin/python tools/compile_vocab_parallel_kernels.py --arch 90 --v-local 152064

Every kernel variant the op can launch on a contiguous shard (forward with and without the influence moments; backward
for log-prob and entropy gradients, log-prob only, entropy only) for bf16, fp16, fp32 and fp64 logits,
at the tile size and warp count the op picks for ``--v-local`` columns, goes through Triton's whole
pipeline to a cubin with the ptxas that ships in Triton's wheel; ``ptxas -v`` then reports registers
and spills, and the PTX shows whether the shard is read (and the gradient written) with 16-byte
vector instructions. It prints one Markdown row per variant and exits non-zero if any compilation fails.
What this does not check: the kernels' speed, and anything the driver decides at load time.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET"):
    sys.exit(
        "compile_vocab_parallel_kernels: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)"
    )

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.ops import vocab_parallel_triton as kernels  # noqa: E402

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
DTYPES = ("bf16", "fp16", "fp32", "fp64")
FORWARD = [
    ("logp+H", {"WANT_INFLUENCE": False, "K": 3}),
    ("logp+H+influence", {"WANT_INFLUENCE": True, "K": 5}),
]
BACKWARD = [
    ("d logp + d H", {"HAS_G_LOGP": True, "HAS_G_ENT": True}),
    ("d logp", {"HAS_G_LOGP": True, "HAS_G_ENT": False}),
    ("d H", {"HAS_G_LOGP": False, "HAS_G_ENT": True}),
]


def _signature(fn, dtype, constexprs):
    """Argument types by name: the logits and gradient in the input dtype, ids int64, per-token
    statistics in the compute dtype, strides and sizes int32 (as Triton types them at run time for
    values below 2^31)."""
    compute = "fp64" if dtype == "fp64" else "fp32"
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("z_ptr", "grad_ptr"):
            sig[name] = f"*{dtype}"
        elif name == "target_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = f"*{compute}"
        else:
            sig[name] = "i32"
    return sig


def _specialization(fn, v_local):
    """What Triton specialises at run time for a contiguous shard: a column stride of 1 becomes a
    constant, and pointers (torch allocations), row strides and the shard width that are multiples
    of 16 are marked 16-divisible, which lets loads and stores vectorise (the valid width, which vocab
    padding makes ragged on the last rank, is left unmarked)."""
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        if name.endswith("_ptr") or (name in ("stride_n", "stride_gn", "v_local") and v_local % 16 == 0):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return {"stride_v": 1}, attrs


def _vector_width(ptx: str, op: str) -> str:
    """The widest global `op` (ld/st) in the PTX: v4 = 16 bytes per thread and instruction."""
    forms = re.findall(rf"{op}\.global(?:\.\w+)*?\.(v[248])\.", ptx)
    return max(forms, default="scalar")


def _ptxas_info(ptx: str) -> tuple[int, int]:
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1).rstrip(",")
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run(
            [str(PTXAS), "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(d) / "k.o")],
            capture_output=True,
            text=True,
            check=True,
        )
    text = out.stdout + out.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return regs, spills


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--arch", default="80,90", help="compute capabilities, comma-separated (80 = A100, 90 = H100/H200)"
    )
    p.add_argument(
        "--v-local", type=int, default=19008, help="columns of one rank's shard (sets tile and warps)"
    )
    args = p.parse_args(argv)
    block, warps = kernels._launch_config(args.v_local)
    print(f"Triton {triton.__version__}, V_local {args.v_local}: BLOCK_V {block}, {warps} warps per program")
    print()
    print("| arch | kernel | logits | variant | widest load | widest store | registers | spill bytes |")
    print("|---|---|---|---|---|---|---|---|")
    failed = 0
    for cc in (int(a) for a in args.arch.split(",")):
        target = GPUTarget("cuda", cc, 32)
        for dtype in DTYPES:
            cdt = tl.float64 if dtype == "fp64" else tl.float32
            jobs = [("forward", kernels._local_moments_kernel, name, c) for name, c in FORWARD]
            jobs += [("backward", kernels._backward_kernel, name, c) for name, c in BACKWARD]
            for kind, fn, variant, const in jobs:
                fixed, attrs = _specialization(fn, args.v_local)
                constexprs = dict(const, BLOCK_V=block, CDT=cdt, **fixed)
                try:
                    src = ASTSource(fn, _signature(fn, dtype, constexprs), constexprs=constexprs, attrs=attrs)
                    compiled = triton.compile(src, target=target, options={"num_warps": warps})
                    ptx = compiled.asm["ptx"]
                    regs, spills = _ptxas_info(ptx)
                    ld, st = _vector_width(ptx, "ld"), _vector_width(ptx, "st")
                    print(
                        f"| sm_{cc} | {kind} | {dtype} | {variant} | {ld} | {st} | {regs} | {spills} |",
                        flush=True,
                    )
                except Exception as e:  # report every variant, then fail
                    failed += 1
                    print(
                        f"| sm_{cc} | {kind} | {dtype} | {variant} | FAILED: {type(e).__name__}: {e} | | | |"
                    )
    if failed:
        print(f"{failed} variant(s) failed to compile", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
