import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from tsdsae import export, features, inference
from tsdsae.config import apply_overrides, debug
from tsdsae.toy import synthesise

# Runs in a fresh interpreter where `import tsdsae` fails: the artifact needs torch only.
RUNNER = textwrap.dedent("""
    import sys
    sys.modules["tsdsae"] = None
    import numpy as np
    import torch

    art, io = sys.argv[1], sys.argv[2]
    prog = {n: torch.export.load(f"{art}/{n}.pt2").module()
            for n in ("log_mel", "v_mean", "z_mean", "decode")}
    audio = torch.from_numpy(np.load(f"{io}/audio.npy", allow_pickle=False))
    x = prog["log_mel"](audio)
    x_short = torch.from_numpy(np.load(f"{io}/x_short.npy", allow_pickle=False))
    outs = {"x": x}
    for tag, feats in (("", x), ("_short", x_short)):
        mask = torch.ones(feats.shape[:2], dtype=torch.bool)
        v, z = prog["v_mean"](feats, mask), prog["z_mean"](feats, mask)
        outs.update({"v" + tag: v, "z" + tag: z, "recon" + tag: prog["decode"](z, v, mask),
                     "gswap" + tag: prog["decode"](z, v.flip(0), mask)})
    for name, value in outs.items():
        np.save(f"{io}/out_{name}.npy", value.detach().numpy())
""")


def test_export_round_trip_in_a_fresh_process(checkpoint_path, tmp_path):
    art = tmp_path / "exported"
    assert export.main(["--checkpoint", checkpoint_path, "--out", str(art)]) == 0
    manifest = json.loads((art / "manifest.json").read_text())
    assert set(manifest["programs"]) == {"log_mel", "v_mean", "z_mean", "decode"}
    # the paper's frame-wise MLP model keeps batch and length dynamic
    assert all(p["dynamic"] == ["B", "T"] for n, p in manifest["programs"].items()
               if n != "log_mel")

    melodies = [[60, 62, 64, 65, 67, 69, 71, 72], [72, 67, 64, 60, 62, 65, 69, 71],
                [55, 59, 62, 67, 66, 62, 59, 55]]
    audio = np.stack([synthesise(np.array(m), "saw", 4.0) for m in melodies])
    audio = features.peak_normalise(torch.from_numpy(audio)).numpy()
    x_short = features.log_mel(torch.from_numpy(audio[:2, :40_000])).numpy()   # T = 157
    io = tmp_path / "io"
    io.mkdir()
    np.save(io / "audio.npy", audio)
    np.save(io / "x_short.npy", x_short)
    (tmp_path / "runner.py").write_text(RUNNER)
    proc = subprocess.run([sys.executable, "-I", str(tmp_path / "runner.py"), str(art), str(io)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    model = inference.load(checkpoint_path)
    for tag, feats in (("", features.log_mel(torch.from_numpy(audio))),
                       ("_short", torch.from_numpy(x_short))):
        got = {k: torch.from_numpy(np.load(io / f"out_{k}{tag}.npy"))
               for k in ("v", "z", "recon", "gswap")}
        enc = model.encode(feats)
        torch.testing.assert_close(got["v"], enc.v, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got["z"], enc.z, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got["recon"], model.reconstruct(feats), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got["gswap"], model.swap_global(feats, feats.flip(0)),
                                   atol=1e-4, rtol=1e-4)
        if not tag:
            torch.testing.assert_close(torch.from_numpy(np.load(io / "out_x.npy")), feats,
                                       atol=1e-4, rtol=1e-4)


def test_recurrent_models_export_at_a_fixed_length(tmp_path):
    cfg = apply_overrides(debug(), ["model.z_posterior=>", "model.likelihood=><"]).model
    torch.manual_seed(0)
    model = export.DSAE(cfg)
    manifest = export.export_model(model, tmp_path, frames=12)
    programs = manifest["programs"]
    assert programs["v_mean"]["dynamic"] == ["B", "T"]
    assert programs["z_mean"]["dynamic"] == ["B"] and programs["z_mean"]["static"] == {"T": 12}
    z_mean = torch.export.load(str(tmp_path / "z_mean.pt2")).module()
    x, mask = torch.randn(3, 12, 80), torch.ones(3, 12, dtype=torch.bool)
    torch.testing.assert_close(z_mean(x, mask), model.encode_means(x, mask)[1])


def test_export_cli_reports_a_missing_checkpoint(tmp_path, capsys):
    assert export.main(["--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path)]) == 2
    assert "none.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        export.main(["--help"])
    assert exit_.value.code == 0
