"""Where a low raw pitch accuracy comes from: the model, or the metric (CREPE, Griffin-Lim).

    python benchmarks/pitch_ceiling.py runs/NAME/best.pt data/varied [--clips 16] [--full]

On the first `--clips` test clips (the dataset must store audio), one JSON line per CREPE model
(tiny; with --full also full) of raw pitch accuracies (tsdsae.pitch, 50 cents) and mean
periodicities:
- Griffin-Lim of the input's log-mel against CREPE on the recorded audio, and against
  Griffin-Lim of the same input with another random phase: what the metric gives a perfect
  reconstruction (its ceiling);
- the reconstruction decode(z, v) (posterior means) as the evaluation scores it (frames below
  periodicity 0.5 unvoiced, so wrong), and with every frame's f0 kept;
- the mean periodicity of the input's and the reconstruction's Griffin-Lim audio where the
  reference is voiced;
then one line with the reconstruction's log-mel error per element and the features' variance.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main(argv=None) -> int:
    from tsdsae import inference
    from tsdsae.data import load_dataset
    from tsdsae.evaluate import listen
    from tsdsae.pitch import crepe_f0, mean_rpa, raw_pitch_accuracy

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("data", help="dataset URI with audio (a folder or s3://...)")
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--full", action="store_true", help="also CREPE full (slow on a CPU)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = inference.load(args.checkpoint)
    test = load_dataset(args.data, splits=["test"], with_audio=True)["test"]
    if test.audio is None:
        raise SystemExit(f"{args.data} stores no audio; the ceiling needs the recordings")
    idx = torch.arange(min(args.clips, len(test)))
    x, mask = test.features[idx], test.mask[idx]
    with torch.no_grad():
        enc = model.encode(x, mask)
        recon = model.decode(enc.z, enc.v, enc.mask)

    def griffin_lim(feats, seed):
        torch.manual_seed(seed)
        return listen(feats, mask, 32)

    def rpa(ref, est):
        return round(mean_rpa(raw_pitch_accuracy(ref, est)), 3)

    heard = {"input": griffin_lim(x, 0), "input_other_phase": griffin_lim(x, 1),
             "recon": griffin_lim(recon, 0)}
    recorded = test.audio[idx][:, :heard["input"].shape[1]]
    for crepe in ("tiny", "full") if args.full else ("tiny",):
        truth = crepe_f0(recorded, crepe)
        ref = crepe_f0(heard["input"], crepe)
        est = crepe_f0(heard["recon"], crepe)
        voiced = ref.f0 > 0
        print(json.dumps({
            "crepe": crepe, "clips": len(idx),
            "gl_input_vs_recording": rpa(truth, ref),
            "gl_input_vs_other_phase": rpa(ref, crepe_f0(heard["input_other_phase"], crepe)),
            "recon_as_scored": rpa(ref, est),
            "recon_every_frame": rpa(ref, crepe_f0(heard["recon"], crepe, threshold=0.0)),
            "periodicity_input": round(float(ref.periodicity[voiced].mean()), 3),
            "periodicity_recon": round(float(est.periodicity[voiced].mean()), 3),
            "voiced_fraction": round(float(voiced.mean()), 3)}), flush=True)
    print(json.dumps({"recon_mse_per_element": round(((recon - x) ** 2)[mask].mean().item(), 3),
                      "feature_variance": round(x[mask].var().item(), 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
