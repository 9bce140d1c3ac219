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


def _network(model: str, device: torch.device):
    """torchcrepe's bundled network for `model` on `device`, in eval mode (loaded once)."""
    import torchcrepe

    if (getattr(torchcrepe.infer, "capacity", None) != model
            or not hasattr(torchcrepe.infer, "model")
            or next(torchcrepe.infer.model.parameters()).device != device):
        torchcrepe.load.model(str(device), model)
    return torchcrepe.infer.model.eval()


def crepe_probabilities(net, frames: torch.Tensor) -> torch.Tensor:
    """CREPE's forward pass (torchcrepe.model.Crepe.forward, the same weights and operations)
    on normalised frames (N, 1024) -> pitch-bin activations (N, 360).

    torchcrepe writes its convolutions as 2-D ones over a (1024, 1) image; oneDNN runs those
    about 2x slower on CPU than the equal 1-D convolutions used here (same padding, stride,
    ReLU, batch norm in eval mode, max-pool 2). tests/test_pitch.py compares both."""
    import torch.nn.functional as F

    x = frames[:, None, :]
    for k in range(1, 7):
        conv, bn = getattr(net, f"conv{k}"), getattr(net, f"conv{k}_BN")
        x = F.pad(x, (254, 254) if k == 1 else (31, 32))
        x = F.conv1d(x, conv.weight[..., 0], conv.bias, stride=conv.stride[0])
        x = F.batch_norm(F.relu(x), bn.running_mean, bn.running_var, bn.weight, bn.bias,
                         training=False, eps=bn.eps)
        x = F.max_pool1d(x, 2, 2)
    return torch.sigmoid(net.classifier(x.permute(0, 2, 1).reshape(x.shape[0], -1)))


@torch.no_grad()
def crepe_f0(audio: torch.Tensor | np.ndarray, model: str = "full",
             decoder: str = "weighted_argmax",
             threshold: float = PERIODICITY_THRESHOLD, device: str | torch.device = "cpu",
             frames_per_batch: int = 1024, progress: bool = False,
             only: np.ndarray | None = None) -> PitchTrack:
    """f0 of mono 16 kHz audio (S,) or (B, S) at a 10 ms hop -> PitchTrack with T' = 1 + S // 160.

    `model` 'full' (the paper's) or 'tiny'; `decoder` one of DECODERS; at most
    `frames_per_batch` CREPE frames go through the network at once. `only` (B, T') bool: run
    CREPE on those frames alone, the others get f0 0 and periodicity 0 (unvoiced); for an
    estimate whose reference is unvoiced on the other frames, raw pitch accuracy is the same
    (it counts only the reference's voiced frames). Needs a frame-wise decoder (not viterbi).
    Raises ValueError for an unknown model or decoder, or audio of another rank.
    """
    import torchcrepe

    if model not in MODELS:
        raise ValueError(f"CREPE model {model!r} is not one of {list(MODELS)} (the weights "
                         "torchcrepe ships)")
    device = torch.device(device)
    x = torch.as_tensor(audio, dtype=torch.float32)
    x = x[None] if x.dim() == 1 else x
    if x.dim() != 2:
        raise ValueError(f"audio must be (S,) or (B, S), got shape {tuple(x.shape)}")
    decode = _decoder(decoder)
    if only is not None and decoder == "viterbi":
        raise ValueError("frame selection (`only`) needs a frame-wise decoder, not viterbi")
    n_clips, n_frames = x.shape[0], 1 + x.shape[1] // CREPE_HOP
    keep = (torch.ones(n_clips, n_frames, dtype=torch.bool) if only is None
            else torch.as_tensor(np.asarray(only, dtype=bool)))
    if keep.shape != (n_clips, n_frames):
        raise ValueError(f"`only` must be {(n_clips, n_frames)}, got {tuple(keep.shape)}")
    net = _network(model, device)
    # Normalised frames of the kept positions (torchcrepe.preprocess: zero-padded, mean-centred,
    # scaled by the frame's standard deviation), a few clips at a time to bound memory.
    per_clip = max(1, (8 * frames_per_batch) // n_frames)
    chunks = []
    for s in range(0, n_clips, per_clip):
        frames = next(torchcrepe.preprocess(x[s:s + per_clip], features.SAMPLE_RATE, CREPE_HOP,
                                            None, device, pad=True))
        chunks.append(frames[keep[s:s + per_clip].reshape(-1).to(device)])
    frames = torch.cat(chunks) if chunks else torch.zeros(0, torchcrepe.WINDOW_SIZE)
    starts = range(0, len(frames), frames_per_batch)
    if progress:
        from tqdm.auto import tqdm
        starts = tqdm(starts, desc=f"CREPE {model}", unit="batch", leave=False)
    probs = [crepe_probabilities(net, frames[s:s + frames_per_batch]) for s in starts]
    f0 = np.zeros((n_clips, n_frames))
    periodicity = np.zeros((n_clips, n_frames))
    if probs:
        p = torch.cat(probs)                                   # (N, 360)
        got_f0, got_p = torchcrepe.postprocess(p.T[None], 50.0, torchcrepe.MAX_FMAX, decode,
                                               return_periodicity=True)
        flat = keep.reshape(-1).numpy()
        f0.reshape(-1)[flat] = got_f0[0].cpu().double().numpy()
        periodicity.reshape(-1)[flat] = got_p[0].cpu().double().numpy()
    f0 = np.where(periodicity >= threshold, f0, 0.0)
    times = np.arange(n_frames) * CREPE_HOP / features.SAMPLE_RATE
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
