"""tools/bench_packing.py runs end to end (--quick) and prints its table; timings are not asserted."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_packing_quick_prints_both_layouts_and_packing_wastes_less():
    out = subprocess.run([sys.executable, str(REPO / "tools" / "bench_packing.py"), "--quick"],
                         capture_output=True, text=True, timeout=600, check=True).stdout  # fmt: skip
    rows = {
        line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| pa")
    }
    assert set(rows) == {"padded", "packed", "packed+pre-forward"}
    # padding efficiency: packed rows on CPU are as long as a micro-batch's longest sample, so they
    # pad at their ends (0.91 on --quick's seeded lengths); padded rows waste most of their slots
    packed, padded = float(rows["packed"][5]), float(rows["padded"][5])
    assert 0.9 <= packed <= 1.0 and padded < 0.6, (packed, padded)
    assert rows["packed"][4] == rows["padded"][4]  # the same real tokens
    assert "--quick: a smoke run" in out
