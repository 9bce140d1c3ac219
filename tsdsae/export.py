"""Export a checkpoint as standalone torch.export programs (no tsdsae needed to run them).

    python -m tsdsae.export --checkpoint runs/toy-ts/best.pt --out exported/

Writes to the output folder:
    log_mel.pt2    audio (B, S) float32, mono 16 kHz peak-normalised -> log-mel (B, T, 80),
                   T = 1 + S // 256 (the front end, tsdsae.features)
    v_mean.pt2     x (B, T, 80) float32, mask (B, T) bool -> mean of q(v | x)    (B, V)
    z_mean.pt2     x (B, T, 80) float32, mask (B, T) bool -> mean of q(z | x)    (B, T, Z)
    decode.pt2     z (B, T, Z), v (B, V), mask (B, T) bool -> mean of p(x | z, v) (B, T, 80)
    manifest.json  the above with V, Z, which dimensions are dynamic, the feature parameters and
                   the run config

Use them from any Python with torch:

    import torch
    prog = {n: torch.export.load(f"exported/{n}.pt2").module()
            for n in ("log_mel", "v_mean", "z_mean", "decode")}
    x = prog["log_mel"](audio); mask = torch.ones(x.shape[:2], dtype=torch.bool)
    swapped = prog["decode"](prog["z_mean"](x_a, mask_a), prog["v_mean"](x_b, mask_b), mask_a)

B and T are dynamic where the architecture allows. Recurrent parts (LSTM options, the
autoregressive z posteriors) are exported at a fixed T, `--frames` (default 251 = a 4 s clip);
the manifest lists the static sizes, and inputs of another length must be padded or cropped to
it (padding masked out). Listening (Griffin-Lim) is not part of the export. Programs are exported
on, and run on, the CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from tsdsae import features
from tsdsae.cli import cli_main
from tsdsae.storage import redact_url
from tsdsae.model.dsae import DSAE

PROGRAMS = ("log_mel", "v_mean", "z_mean", "decode")
MAX_BATCH = 65536
MAX_FRAMES = 1_000_000


class LogMel(nn.Module):
    """audio (B, S) -> log-mel (B, T, F): the front end's own transform (tsdsae.features)."""

    def __init__(self):
        super().__init__()
        self.mel = features._mel("cpu")

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return torch.log(self.mel(audio) + features.LOG_EPS).transpose(1, 2)


class VMean(nn.Module):
    """x (B, T, F), mask (B, T) -> mean of q(v | x) (B, V)."""

    def __init__(self, model: DSAE):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.v_posterior(x, mask).mean


class ZMean(nn.Module):
    """x (B, T, F), mask (B, T) -> mean of q(z | x) (B, T, Z) (v at its mean where z needs it)."""

    def __init__(self, model: DSAE):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x, mask, sample=False)[3]


class Decode(nn.Module):
    """z (B, T, Z), v (B, V), mask (B, T) -> mean of p(x | z, v) (B, T, F)."""

    def __init__(self, model: DSAE):
        super().__init__()
        self.model = model

    def forward(self, z: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.decode(z, v, mask)


def _export(module: nn.Module, args: tuple, dims: tuple[dict, ...]):
    """torch.export with as many dynamic dims as the module allows: first all of `dims`
    (e.g. {0: "B", 1: "T"} per input), then without T, then fully static.
    Returns (ExportedProgram, names of the dynamic dims)."""
    batch = torch.export.Dim("B", min=1, max=MAX_BATCH)
    frames = torch.export.Dim("T", min=2, max=MAX_FRAMES)
    samples = torch.export.Dim("S", min=features.N_FFT, max=MAX_FRAMES * features.HOP)
    by_name = {"B": batch, "T": frames, "S": samples}
    attempts = [("B", "T", "S"), ("B", "S"), ("S",), ()]
    last_error: Exception | None = None
    for keep in attempts:
        shapes = tuple({axis: by_name[n] for axis, n in d.items() if n in keep} or None
                       for d in dims)
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # nn.LSTM re-assigns its flat weight list while traced; harmless here.
                warnings.filterwarnings("ignore", message=".*were assigned during export.*")
                program = torch.export.export(module, args, dynamic_shapes=shapes)
        except Exception as exc:     # noqa: BLE001 - a specialised dim: retry with fewer
            last_error = exc
            continue
        used = sorted({n for d in dims for n in d.values() if n in keep})
        return program, used
    raise RuntimeError(f"could not export {type(module).__name__}: {last_error}") from last_error


def export_model(model: DSAE, out_dir: str | Path,
                 frames: int = features.num_frames(features.CLIP_SAMPLES),
                 config: dict | None = None, progress: bool = False) -> dict:
    """Export `model` (on CPU, eval mode) to `out_dir`; returns the manifest (also written).

    `frames` is the example length T, and the fixed length for programs whose T cannot stay
    dynamic. `config` (flat dotted keys) is copied into the manifest.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    cfg = model.cfg
    b, t = 2, int(frames)             # B = 2: sizes 0 and 1 would be specialised by export
    samples = (t - 1) * features.HOP
    x = torch.randn(b, t, cfg.input_dim)
    mask = torch.ones(b, t, dtype=torch.bool)
    z = torch.randn(b, t, cfg.z_dim)
    v = torch.randn(b, cfg.v_dim)
    features.log_mel(torch.zeros(1, samples))      # build the cached transform outside tracing
    specs = {
        "log_mel": (LogMel(), (torch.randn(b, samples),), ({0: "B", 1: "S"},),
                    {"audio": ["B", "S"]}, ["B", "T", cfg.input_dim]),
        "v_mean": (VMean(model), (x, mask), ({0: "B", 1: "T"}, {0: "B", 1: "T"}),
                   {"x": ["B", "T", cfg.input_dim], "mask": ["B", "T"]}, ["B", cfg.v_dim]),
        "z_mean": (ZMean(model), (x, mask), ({0: "B", 1: "T"}, {0: "B", 1: "T"}),
                   {"x": ["B", "T", cfg.input_dim], "mask": ["B", "T"]},
                   ["B", "T", cfg.z_dim]),
        "decode": (Decode(model), (z, v, mask), ({0: "B", 1: "T"}, {0: "B"}, {0: "B", 1: "T"}),
                   {"z": ["B", "T", cfg.z_dim], "v": ["B", cfg.v_dim], "mask": ["B", "T"]},
                   ["B", "T", cfg.input_dim]),
    }
    manifest = {"format": 1, "programs": {}, "feature_params": features.FEATURE_PARAMS,
                "example_frames": t, "v_dim": cfg.v_dim, "z_dim": cfg.z_dim,
                "config": {k: redact_url(v) for k, v in (config or {}).items()}}
    from tqdm.auto import tqdm

    for name in tqdm(specs, desc="exporting", unit="program", disable=not progress):
        module, args, dims, inputs, output = specs[name]
        program, dynamic = _export(module, args, dims)
        path = out / f"{name}.pt2"
        with warnings.catch_warnings():
            # about weights that live off the CPU; everything is exported on the CPU
            warnings.filterwarnings("ignore", message="No complete tensor found")
            torch.export.save(program, str(path))
        sizes = {"B": b, "T": t, "S": samples}
        axes = {n for d in dims for n in d.values()}
        static = {n: sizes[n] for n in sorted(axes) if n not in dynamic}
        manifest["programs"][name] = {"file": path.name, "inputs": inputs, "output": output,
                                      "dynamic": dynamic, "static": static}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tsdsae.export",
        description="Export a checkpoint's encoders, decoder and front end as torch.export "
                    "programs (.pt2) that run with plain torch, without the tsdsae package.")
    p.add_argument("--checkpoint", required=True, help="checkpoint path or s3:// URI")
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--frames", type=int, default=features.num_frames(features.CLIP_SAMPLES),
                   help="example length T in frames; the fixed T of recurrent programs "
                        "(default 251 = 4 s)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint for s3:// checkpoints")
    args = p.parse_args(argv)
    from tsdsae import checkpoint
    from tsdsae.inference import model_from_state

    if args.frames < 2:
        print(f"error: --frames {args.frames} must be at least 2", file=sys.stderr)
        return 2
    state = checkpoint.load(args.checkpoint, endpoint_url=args.endpoint_url)
    model, _ = model_from_state(state, args.checkpoint)
    manifest = export_model(model, args.out, args.frames, state["config"], progress=True)
    print(json.dumps({name: {"file": str(Path(args.out) / spec["file"]),
                             "dynamic": spec["dynamic"], "static": spec["static"]}
                      for name, spec in manifest["programs"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
