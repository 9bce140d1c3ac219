"""The benchmark scripts run and print JSON lines (timings themselves are not asserted)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import grid_cost  # noqa: E402


def test_step_rate_prints_json_lines():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_rate.py"), "--model",
                          "ts_dsae", "--stage", "2", "--z-dim", "8", "--batch", "4", "--frames",
                          "10", "--steps", "1", "--warmup", "1", "--threads", "1"],
                         capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and rows[0]["model"] == "ts_dsae" and rows[0]["stage"] == 2
    assert rows[0]["steps_per_s"] > 0 and rows[0]["batch"] == 4


def test_grid_cost_counts_the_papers_grid():
    rates = {(v, s, z): 0.01 for v, s in grid_cost.JOBS for z in (8, 16, 32)}
    rows = grid_cost.grid_cost(rates, [8, 16, 32], 6, 2, ["dmelodies", "urmp"], 4000, 300, 128,
                               0.0, 1.0)
    grid = rows[-1]
    assert grid["runs"] == 288
    # every step 10 ms, no validation: DSAE 4000 epochs, stage 1 once, three stage-2 forks
    steps = 6 * 2 * 3 * (19 + 17) * (4000 + 300 + 3 * 3700)
    assert abs(grid["device_hours"] - steps * 0.01 / 3600) < 0.01
    packed = grid_cost.grid_cost(rates, [8, 16, 32], 6, 2, ["dmelodies", "urmp"], 4000, 300,
                                 128, 0.0, 4.0)[-1]
    assert abs(packed["device_hours"] * 4 - grid["device_hours"]) < 0.05
