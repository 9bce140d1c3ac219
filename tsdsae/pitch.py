"""The local-latent metric (METHOD s6): raw pitch accuracy of CREPE f0 tracks.

1. f0 of 16 kHz audio by CREPE (torchcrepe with its bundled 'full' or 'tiny' weights; nothing is
   downloaded) at a 10 ms hop, with periodicity; frames with periodicity < 0.5 are unvoiced
   (f0 = 0 Hz).
2. Per clip, mir_eval `melody.to_cent_voicing` on the reference and estimate tracks, then
   `melody.raw_pitch_accuracy` with a 50 cent tolerance: the fraction of the reference's voiced
   frames where the estimate's pitch is within 50 cents. An estimate frame judged unvoiced
   (0 Hz) cannot be correct.
3. Clips are averaged; a clip whose reference has no voiced frame has no RPA (NaN) and is left
   out of the average.

In evaluation the reference is Griffin-Lim audio of the input features and the estimates are
Griffin-Lim audio of the reconstruction and the swaps (pitch must follow z). 'full' is what the
paper uses; 'tiny' is about 15x faster on CPU.

Decoding: CREPE's own weighted average around the most active bin (torchcrepe's
`weighted_argmax`). torchcrepe's default Viterbi decoder runs on a softmax of sigmoid
activations, which is nearly flat; on Griffin-Lim audio (peak activations about 0.5) its
row-normalised transitions pull the path onto the edge bin (about 2 kHz) for whole clips, so it
is offered but not the default.
"""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import torch

from tsdsae import features

CREPE_HOP = features.SAMPLE_RATE // 100        # 10 ms
PERIODICITY_THRESHOLD = 0.5
CENT_TOLERANCE = 50.0
MODELS = ("full", "tiny")
DECODERS = ("viterbi", "argmax", "weighted_argmax")


@dataclasses.dataclass
class PitchTrack:
    """CREPE output for a batch: f0 (B, T') Hz with 0 on unvoiced frames, periodicity (B, T')
    in [0, 1], times (T',) seconds (frame k at k * 10 ms)."""

    f0: np.ndarray
    periodicity: np.ndarray
    times: np.ndarray

    def __len__(self) -> int:
        return self.f0.shape[0]

    def __getitem__(self, index) -> "PitchTrack":
        index = np.atleast_1d(np.arange(len(self))[index])
        return PitchTrack(self.f0[index], self.periodicity[index], self.times)


def _decoder(name: str):
    import torchcrepe

    if name not in DECODERS:
        raise ValueError(f"CREPE decoder {name!r} is not one of {list(DECODERS)}")
    return getattr(torchcrepe.decode, name)


@torch.no_grad()
def crepe_f0(audio: torch.Tensor | np.ndarray, model: str = "full",
             decoder: str = "weighted_argmax",
             threshold: float = PERIODICITY_THRESHOLD, device: str | torch.device = "cpu",
             frames_per_batch: int = 1024, progress: bool = False) -> PitchTrack:
    """f0 of mono 16 kHz audio (S,) or (B, S) at a 10 ms hop -> PitchTrack with T' = 1 + S // 160.

    `model` 'full' (the paper's) or 'tiny'; `decoder` one of DECODERS; at most `frames_per_batch` CREPE frames go through the network at once.
    """
    import torchcrepe

    if model not in MODELS:
        raise ValueError(f"CREPE model {model!r} is not one of {list(MODELS)} (the weights "
                         "torchcrepe ships)")
    x = torch.as_tensor(audio, dtype=torch.float32)
    x = x[None] if x.dim() == 1 else x
    if x.dim() != 2:
        raise ValueError(f"audio must be (S,) or (B, S), got shape {tuple(x.shape)}")
    frames = 1 + x.shape[1] // CREPE_HOP
    per_forward = max(1, frames_per_batch // frames)       # clips per network pass
    decode = _decoder(decoder)
    f0s, periodicities = [], []
    starts = range(0, x.shape[0], per_forward)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=f"CREPE {model}", unit="batch", leave=False)
    for s in starts:
        chunk = x[s:s + per_forward]
        f0, periodicity = torchcrepe.predict(
            chunk, features.SAMPLE_RATE, CREPE_HOP, model=model, decoder=decode,
            return_periodicity=True, batch_size=max(1, frames_per_batch // chunk.shape[0]),
            device=str(device), pad=True)
        f0s.append(f0.cpu())
        periodicities.append(periodicity.cpu())
    f0 = torch.cat(f0s).double().numpy()
    periodicity = torch.cat(periodicities).double().numpy()
    f0 = np.where(periodicity >= threshold, f0, 0.0)
    times = np.arange(f0.shape[1]) * CREPE_HOP / features.SAMPLE_RATE
    return PitchTrack(f0, periodicity, times)


def raw_pitch_accuracy(reference: PitchTrack, estimate: PitchTrack,
                       cent_tolerance: float = CENT_TOLERANCE) -> np.ndarray:
    """Per-clip RPA (B,) of `estimate` against `reference` (equal B); NaN where the reference
    has no voiced frame."""
    import mir_eval

    if len(reference) != len(estimate):
        raise ValueError(f"{len(reference)} reference tracks but {len(estimate)} estimates")
    out = np.full(len(reference), np.nan)
    with warnings.catch_warnings():
        # mir_eval warns about all-unvoiced tracks; those are handled here (NaN / 0).
        warnings.simplefilter("ignore")
        for i in range(len(reference)):
            ref_f0, est_f0 = reference.f0[i], estimate.f0[i]
            if not (ref_f0 > 0).any():
                continue
            ref_v, ref_c, est_v, est_c = mir_eval.melody.to_cent_voicing(
                reference.times, ref_f0, estimate.times, est_f0)
            out[i] = mir_eval.melody.raw_pitch_accuracy(ref_v, ref_c, est_v, est_c,
                                                        cent_tolerance=cent_tolerance)
    return out


def mean_rpa(values: np.ndarray) -> float:
    """Average of per-clip RPAs over clips that have one (NaN when none has)."""
    values = np.asarray(values, dtype=np.float64)
    ok = ~np.isnan(values)
    return float(values[ok].mean()) if ok.any() else float("nan")
