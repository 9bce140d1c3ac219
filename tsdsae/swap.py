"""Hear the disentanglement: reconstruct two clips and swap their latents.

    python -m tsdsae.swap --checkpoint runs/toy-ts/best.pt --content a.wav --timbre b.wav --out swaps/
    python -m tsdsae.swap --checkpoint CKPT --content data/dm#val/KEY1 --timbre data/dm#val/KEY2 --out DIR

Writes to DIR (16 kHz mono 16-bit WAV, Griffin-Lim of the decoded log-mel, METHOD s1):
    content_input.wav, timbre_input.wav     the prepared inputs (mono, 16 kHz, 4 s, peak 1)
    content_recon.wav, timbre_recon.wav     decode(z_A, v_A), decode(z_B, v_B)
    global_swap.wav                         decode(z_A, v_B): A's melody with B's timbre
    local_swap.wav                          decode(z_B, v_A): B's melody with A's timbre
    swap_grid.png                           log-mel of inputs, reconstructions and swaps
    swap.json                               what was written, and with --pitch the CREPE RPAs
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from tsdsae.cli import cli_main
from tsdsae.features import LOG_EPS
from tsdsae.inference import (DEFAULT_SECONDS, AudioError, Clip, InferenceModel, load,
                              read_clip, write_wav)

SILENT_LOG_MEL = math.log(LOG_EPS)


def swap_clips(model: InferenceModel, content: Clip, timbre: Clip, out_dir: str | Path,
               griffin_lim_iters: int = 32, pitch: bool = False, crepe_model: str = "full",
               seed: int = 0, progress: bool = True, checkpoint: str | None = None) -> dict:
    """Write the reconstructions, both swaps, the inputs and a spectrogram grid to `out_dir`.

    Returns the summary also written to swap.json: {"files": {name: path}, "content": ...,
    "timbre": ..., "checkpoint" (the `checkpoint` named, credentials removed), "audio" (how the
    WAVs are scaled), and with `pitch` "rpa": {"content_recon", "timbre_recon", "global_swap",
    "local_swap"}} (raw pitch accuracy against Griffin-Lim audio of the input whose z was
    decoded). Griffin-Lim's random phase start is seeded by `seed`.
    """
    from tqdm.auto import tqdm

    from tsdsae.figures import spectrogram_grid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    a = model.encode(content)
    b = model.encode(timbre)
    feats = {
        "content_input": model.features(content)[0][0],
        "timbre_input": model.features(timbre)[0][0],
        "content_recon": model.decode(a.z, a.v, a.mask)[0],
        "timbre_recon": model.decode(b.z, b.v, b.mask)[0],
        "global_swap": model.decode(a.z, b.v, a.mask)[0],      # A's melody, B's timbre
        "local_swap": model.decode(b.z, a.v, b.mask)[0],       # B's melody, A's timbre
    }
    masks = {"content_input": a.mask[0], "timbre_input": b.mask[0]}
    for name in ("content_input", "timbre_input"):
        # input features of padding are zeros (dataset convention); show them as silence
        feats[name] = feats[name].masked_fill(~masks[name][:, None], SILENT_LOG_MEL)
    files: dict[str, str] = {}
    audio: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        files["content_input"] = str(write_wav(out / "content_input.wav", content.audio))
        files["timbre_input"] = str(write_wav(out / "timbre_input.wav", timbre.audio))
        names = ["content_recon", "timbre_recon", "global_swap", "local_swap"]
        for name in tqdm(names, desc="Griffin-Lim", unit="clip", disable=not progress):
            audio[name] = model.to_audio(feats[name], n_iter=griffin_lim_iters)
            files[name] = str(write_wav(out / f"{name}.wav", audio[name]))
        if pitch:
            for name in ("content_input", "timbre_input"):
                audio[name] = model.to_audio(feats[name], n_iter=griffin_lim_iters)
    grid = spectrogram_grid(
        [[("A: content input", feats["content_input"]), ("A: reconstruction", feats["content_recon"]),
          ("global swap: z_A, v_B", feats["global_swap"])],
         [("B: timbre input", feats["timbre_input"]), ("B: reconstruction", feats["timbre_recon"]),
          ("local swap: z_B, v_A", feats["local_swap"])]],
        out / "swap_grid.png", title=f"A = {content.name}\nB = {timbre.name}")
    files["swap_grid"] = str(grid)
    from tsdsae.storage import redact_url

    summary = {"content": content.name, "timbre": timbre.name, "seconds": content.seconds,
               "checkpoint": redact_url(checkpoint) if checkpoint else None,
               "audio": "16 kHz mono; every WAV is peak-normalised (its largest sample is at "
                        "full scale), so compare timbre and pitch, not loudness",
               "files": files}
    if pitch:
        from tsdsae.pitch import crepe_f0, raw_pitch_accuracy
        tracks = {k: crepe_f0(v, model=crepe_model, progress=False) for k, v in audio.items()}
        refs = {"content_recon": "content_input", "timbre_recon": "timbre_input",
                "global_swap": "content_input", "local_swap": "timbre_input"}
        summary["rpa"] = {k: float(raw_pitch_accuracy(tracks[r], tracks[k])[0])
                          for k, r in refs.items()}
        summary["crepe_model"] = crepe_model
    (out / "swap.json").write_text(json.dumps(summary, indent=2))
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tsdsae.swap",
        description="Reconstruct two clips and swap their global (timbre) and local (melody) "
                    "latents; write WAVs (inverse mel + Griffin-Lim) and a spectrogram grid.",
        epilog="A clip is an audio file (any rate, channels, length; cropped or padded to "
               "--seconds) or a dataset sample DATASET_URI#SPLIT/KEY (or DATASET_URI#KEY).")
    p.add_argument("--checkpoint", required=True, help="checkpoint path or s3:// URI")
    p.add_argument("--content", required=True,
                   help="clip A: its melody (z) is kept in the global swap")
    p.add_argument("--timbre", required=True,
                   help="clip B: its timbre (v) is used in the global swap")
    p.add_argument("--content-key", help="sample key (SPLIT/KEY or KEY) when --content is a "
                   "dataset URI")
    p.add_argument("--timbre-key", help="sample key (SPLIT/KEY or KEY) when --timbre is a "
                   "dataset URI")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--seconds", type=float, default=DEFAULT_SECONDS,
                   help=f"crop or zero-pad each clip to this length (default {DEFAULT_SECONDS}; "
                        "0 keeps the file's length)")
    p.add_argument("--offset", type=float, default=0.0, help="start this many seconds in")
    p.add_argument("--griffin-lim-iters", type=int, default=32)
    p.add_argument("--pitch", action="store_true",
                   help="also report CREPE raw pitch accuracy of reconstructions and swaps")
    p.add_argument("--crepe-model", choices=("full", "tiny"), default="full")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// checkpoints/datasets")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@cli_main
def main(argv=None) -> int:
    from tsdsae.data import ShardError
    from tsdsae.storage import StorageError, redact_text

    args = build_parser().parse_args(argv)
    seconds = args.seconds if args.seconds > 0 else None
    try:
        content = read_clip(args.content, seconds, args.offset, args.content_key,
                            args.endpoint_url)
        timbre = read_clip(args.timbre, seconds, args.offset, args.timbre_key, args.endpoint_url)
        model = load(args.checkpoint, args.device, args.endpoint_url)
    except (AudioError, FileNotFoundError, KeyError, ValueError, StorageError, ShardError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {redact_text(str(msg))}", file=sys.stderr)
        return 2
    summary = swap_clips(model, content, timbre, args.out, args.griffin_lim_iters, args.pitch,
                         args.crepe_model, progress=not args.quiet, checkpoint=args.checkpoint)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
