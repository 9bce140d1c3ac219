"""Reading prepared datasets: WebDataset tar shards plus a `dataset.json` manifest, local or on
S3 (tsdsae.storage), into the in-memory form the trainer and the evaluation use.

    manifest.py  the manifest: where the dataset is, which splits and shards it has
    shards.py    one shard: tar reading (tarfile) and every check, decoding of one sample
    memory.py    whole splits as tensors (load_dataset), one split sample by sample

    stream.py    a train split streamed from its shards, each rank its share (open_dataset
                 chooses it when the split is larger than a memory budget)

Training holds each split in memory (a 3,600-clip dMelodies dataset is about 290 MB of
features) unless its train split is larger than data.memory_budget_mb. Importing this package
changes no global state.
"""
from tsdsae.data.manifest import (MANIFEST_NAME, SCHEMA_VERSION, dataset_root, is_dataset_uri,
                                  load_manifest, shard_urls, split_names)
from tsdsae.data.memory import (check_unique_key, iter_split_samples, load_dataset, open_dataset,
                                samples_to_split)
from tsdsae.data.shards import (AUDIO_EXT, FEATURE_EXT, KEY_RE, LABEL_EXT, MEMBER_RE, SAMPLE_EXTS,
                                ShardError, check_sample, check_shard_entry, decode_flac,
                                decode_json, decode_npy, frame_notes, iter_shard_samples,
                                iter_tar_members, read_shard, read_shard_bytes)
from tsdsae.dataset import MissingSplitError

__all__ = [
    "MANIFEST_NAME", "SCHEMA_VERSION", "dataset_root", "is_dataset_uri", "load_manifest",
    "shard_urls", "split_names", "check_unique_key", "iter_split_samples", "load_dataset",
    "open_dataset",
    "samples_to_split",
    "AUDIO_EXT", "FEATURE_EXT", "KEY_RE", "LABEL_EXT", "MEMBER_RE", "SAMPLE_EXTS", "ShardError",
    "check_sample", "check_shard_entry", "decode_flac", "decode_json", "decode_npy",
    "frame_notes", "iter_shard_samples", "iter_tar_members", "read_shard", "read_shard_bytes",
    "MissingSplitError",
]
