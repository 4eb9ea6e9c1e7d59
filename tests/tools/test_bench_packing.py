"""tools/bench_packing.py runs end to end (--quick) and prints its table; timings are not asserted."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_packing_quick_prints_both_layouts_and_full_packing():
    out = subprocess.run([sys.executable, str(REPO / "tools" / "bench_packing.py"), "--quick"],
                         capture_output=True, text=True, timeout=600, check=True).stdout  # fmt: skip
    rows = {
        line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| pa")
    }
    assert set(rows) == {"padded", "packed", "packed+pre-forward"}
    assert float(rows["packed"][5]) == 1.0 and float(rows["padded"][5]) < 0.6  # padding efficiency
    assert rows["packed"][4] == rows["padded"][4]  # the same real tokens
    assert "--quick: a smoke run" in out
