"""The benchmark scripts run and print JSON lines (timings themselves are not asserted)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import grid_cost  # noqa: E402
import pytest  # noqa: E402


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


def test_packed_rate_prints_a_row_per_pack_size_and_feeds_grid_cost(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "packed_rate.py"), "--packs",
                          "1", "2", "--models", "ts_dsae:2", "--z-dim", "8", "--batch", "4",
                          "--frames", "10", "--steps", "1", "--threads", "1"],
                         capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["k"], r["packed"]) for r in rows] == [(1, False), (1, True), (2, True)]
    for r in rows[1:]:
        assert r["trial_steps_per_s"] == round(r["k"] * r["steps_per_s"], 3) or \
            abs(r["trial_steps_per_s"] - r["k"] * r["steps_per_s"]) < 1e-2
        assert r["ratio"] > 0 and r["peak_memory_mb"] > 0
    (tmp_path / "packed.jsonl").write_text(out)
    speedups = grid_cost.load_packing_speedups(str(tmp_path / "packed.jsonl"))
    assert set(speedups) == {2} and speedups[2][0] == max(r["ratio"] for r in rows[1:])
    rates = {(v, s, z): 10.0 for v, s in grid_cost.JOBS for z in (8, 16, 32)}
    rows = grid_cost.grid_cost(rates, [8], 1, 1, ["dmelodies"], 10, 2, 128, 0.0, {2: 2.0})
    plain = grid_cost.grid_cost(rates, [8], 1, 1, ["dmelodies"], 10, 2, 128, 0.0, 1.0)
    stage2 = [r for r in rows if r["job"].endswith("stage2")]
    plain2 = [p for p in plain if p["job"].endswith("stage2")]
    assert len(stage2) == 3 and all(p["device_hours"] > 0.1 for p in plain2)
    assert all(r["device_hours"] * 2 == pytest.approx(p["device_hours"], abs=0.02)
               for r, p in zip(stage2, plain2))
    stage1 = [r for r in rows if r["job"] in ("dsae", "ts_dsae/stage1")]
    assert all(r["packing_speedup"] == 1.0 for r in stage1)


def test_eval_rate_times_each_part_of_a_fresh_toy_runs_evaluation():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "eval_rate.py"),
                          "--pitch-clips", "2", "--threads", "1"],
                         capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    parts = [r["part"] for r in rows]
    assert parts == ["lda_test", "lda_val", "pitch_tiny", "reconstruction_png",
                     "trial_artifacts", "total"]
    total = rows[-1]
    assert total["seconds"] == pytest.approx(sum(r["seconds"] for r in rows[:-1]), abs=0.05)
    assert total["pitch_clips"] == 2 and 0 <= total["gswap"] <= 1


def test_budget_ladder_trains_from_a_pack_at_budgets_in_steps(tmp_path):
    """A toy dataset through --pack-to's file format and back (float16 features), then one
    TS-DSAE and one DSAE run at a budget of 2 + 2 steps (88 training clips: one step an epoch)."""
    import budget_ladder
    import torch

    from tsdsae.toy import make_toy_dataset

    data = make_toy_dataset(128, 0.5, 4, seed=1)
    pack = tmp_path / "toy.npz"
    budget_ladder.write_pack(data, str(pack))
    again = budget_ladder.read_pack(str(pack), "toy")
    for split in data.splits:
        a, b = data[split], again[split]
        assert torch.allclose(a.features, b.features, atol=2e-2) and torch.equal(a.mask, b.mask)
        assert a.keys == b.keys and torch.equal(a.instrument, b.instrument)
    assert again["train"].instruments == data["train"].instruments
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "budget_ladder.py"),
                          "--pack", str(pack), "--budgets", "2:2", "--seeds", "3", "--models",
                          "ts_dsae", "dsae", "--z-dim", "8", "--threads", "1",
                          "--out", str(tmp_path / "ladder")],
                         capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    n_train = len(data["train"])
    per_epoch = -(-n_train // 128)
    assert [r["model"] for r in rows] == ["ts_dsae", "dsae"]
    for r in rows:
        assert r["switch_epoch"] == 2 // per_epoch and r["epochs"] == 4 // per_epoch
        assert 0 <= r["gswap"] <= 1 and len(r["gswap_confusion"]) == 4
        assert (tmp_path / "ladder" / "runs" / f"{r['model']}-z8-s3-2-2" / "best.pt").is_file()
