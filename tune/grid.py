"""Grid files: any dotted config key can be an axis.

A grid YAML has `name`, `preset` (the base config: paper, debug or toy), `axes` (dotted key ->
list of values) and `fixed` (dotted overrides for every trial). Datasets come from the command
line and become the `data.uri` axis. Each grid point is validated against the config tree up
front, so a typo in a grid file fails before any trial starts, naming the file and the key.

Stage-1 sharing: dsae_freeze, ts_dsae_wo_reg and ts_dsae train the same stage 1 (local modules
frozen, N(0, I) prior, no swaps), so grid points that differ only in that variant form one
`TrialGroup`: one Tune trial trains stage 1 once and forks stage 2 per variant.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import yaml

from tsdsae.config import PRESETS, apply_overrides

GRID_DIR = Path(__file__).parent / "grids"
SHARED_STAGE_1 = ("dsae_freeze", "ts_dsae_wo_reg", "ts_dsae")
VARIANT_KEY = "schedule.variant"


@dataclasses.dataclass(frozen=True)
class Grid:
    name: str
    preset: str
    axes: dict[str, list]
    fixed: dict[str, Any]
    source: str = ""

    def size(self) -> int:
        n = 1
        for values in self.axes.values():
            n *= len(values)
        return n


@dataclasses.dataclass(frozen=True)
class TrialGroup:
    """One Tune trial: a stage-1 configuration and the variants that continue from it."""

    key: str                      # stable id from the shared configuration
    overrides: dict[str, Any]     # every dotted override except the variant
    variants: tuple[str, ...]     # dsae alone, or any subset of SHARED_STAGE_1 (shared stage 1)
    coords: dict[str, Any]        # the grid coordinates (axis values) without the variant


def _yaml_value(v):
    return list(v) if isinstance(v, tuple) else v


def load_grid(name_or_path: str) -> Grid:
    """'paper' / 'architecture' / 'capacity' / 'smoke' (shipped) or a path to a YAML grid."""
    path = Path(name_or_path)
    if not path.suffix:
        path = GRID_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        shipped = sorted(p.stem for p in GRID_DIR.glob("*.yaml"))
        raise ValueError(f"grid {name_or_path!r} not found: give a YAML file or one of {shipped}")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"name", "preset", "axes", "fixed"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}; "
                         "allowed: name, preset, axes, fixed")
    preset = raw.get("preset", "paper")
    if preset not in PRESETS:
        raise ValueError(f"{path}: preset={preset!r}; choose one of {sorted(PRESETS)}")
    axes = raw.get("axes") or {}
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"{path}: axis {key!r} must be a non-empty list of values")
    grid = Grid(raw.get("name", path.stem), preset, dict(axes), dict(raw.get("fixed") or {}),
                str(path))
    validate(grid)
    return grid


def narrow(grid: Grid, only: dict[str, list]) -> Grid:
    """Keep only the given values of some axes (or pin a key that is not an axis)."""
    axes, fixed = dict(grid.axes), dict(grid.fixed)
    for key, values in only.items():
        if key in axes:
            keep = [v for v in axes[key] if _norm(v) in {_norm(x) for x in values}]
            if not keep:
                raise ValueError(f"--only {key}: none of {values} is on the grid axis {axes[key]}")
            axes[key] = keep
        else:
            if len(values) == 1:
                fixed[key] = values[0]
            else:
                axes[key] = list(values)
    out = dataclasses.replace(grid, axes=axes, fixed=fixed)
    validate(out)
    return out


def _norm(v):
    return json.dumps(_yaml_value(v), sort_keys=True)


def points(grid: Grid, datasets: list[str] | None = None) -> list[dict[str, Any]]:
    """Every grid point as a flat dict of dotted overrides (datasets as the data.uri axis)."""
    axes = dict(grid.axes)
    if datasets:
        axes["data.uri"] = list(datasets)
    keys = list(axes)
    out = []
    for combo in itertools.product(*(axes[k] for k in keys)):
        point = dict(grid.fixed)
        point.update({k: _yaml_value(v) for k, v in zip(keys, combo)})
        out.append(point)
    return out


def validate(grid: Grid) -> None:
    base = PRESETS[grid.preset]()
    for point in points(grid) or [dict(grid.fixed)]:
        try:
            apply_overrides(base, point)
        except ValueError as exc:
            raise ValueError(f"grid {grid.source or grid.name}: {exc}") from None


def group_key(overrides: dict[str, Any]) -> str:
    blob = json.dumps({k: _yaml_value(v) for k, v in sorted(overrides.items())}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def trial_groups(grid: Grid, datasets: list[str] | None = None,
                 share_stage_1: bool = True) -> list[TrialGroup]:
    """Grid points folded into trials; two-stage variants with equal other keys share stage 1."""
    axis_keys = [k for k in grid.axes if k != VARIANT_KEY] + (["data.uri"] if datasets else [])
    base_variant = PRESETS[grid.preset]().schedule.variant
    groups: dict[str, dict] = {}
    for point in points(grid, datasets):
        variant = point.get(VARIANT_KEY, base_variant)
        rest = {k: v for k, v in point.items() if k != VARIANT_KEY}
        shared = share_stage_1 and variant in SHARED_STAGE_1
        key = group_key({**rest, "_group": "stage1" if shared else variant})
        g = groups.setdefault(key, {"overrides": rest, "variants": [],
                                    "coords": {k: point[k] for k in axis_keys if k in point}})
        g["variants"].append(variant)
    return [TrialGroup(k, g["overrides"], tuple(g["variants"]), g["coords"])
            for k, g in groups.items()]


def parse_only(items: list[str]) -> dict[str, list]:
    """['model.z_dim=8,16', 'seed=831'] -> {'model.z_dim': [8, 16], 'seed': [831]}."""
    out: dict[str, list] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--only {item!r} must look like key=v1,v2")
        key, values = item.split("=", 1)
        out[key.strip()] = [yaml.safe_load(v) for v in values.split(",") if v.strip()]
    return out
