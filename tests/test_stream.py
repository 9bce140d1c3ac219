"""Streaming the train split from its shards (tsdsae.data.stream): each rank's share, equal
batches on every rank, an order that is a function of (seed, epoch, world size), the reader's
checks, and training and evaluation on a streamed dataset."""
import shutil

import pytest
import torch

from tsdsae.config import apply_overrides, debug
from tsdsae.data import ShardError, load_dataset, open_dataset
from tsdsae.data.stream import StreamSplit, split_bytes
from tsdsae.dataset import batch_parts
from tsdsae.trainer import Trainer


def _keys(stream: StreamSplit, seed, epoch, rank, world, batch=5) -> list[list[int]]:
    """The batches of one rank as lists of clip ids (the features' first value identifies it)."""
    return [[round(float(v), 4) for v in x[:count, 0, 0]]
            for x, _, count, _, _ in stream.batches(batch, seed, epoch, rank, world)]


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_every_rank_gets_the_in_memory_parts_and_as_many_batches(small_dmelodies, world):
    """16 clips in 4 shards: with 3 ranks the shares are 2, 1 and 1 shards (8, 4, 4 clips) and
    a rank whose share runs out starts over on it; with 5 ranks there are fewer shards than
    ranks. Every rank has ceil(16 / 5) = 4 batches whose sizes are the in-memory path's parts,
    so DDP's all-reduces stay in step."""
    stream = StreamSplit(small_dmelodies, "train", buffer=3)
    assert len(stream) == 16 and len(stream.shards) == 4
    for rank in range(world):
        sizes = [(count, size) for _, _, count, size, _ in stream.batches(5, 1, 0, rank, world)]
        assert sizes == [(len(p), s) for p, s in batch_parts(16, 5, 1, 0, rank, world)]
    shares = [len(stream.rank_shards(1, 0, r, world)) for r in range(world)]
    assert sum(shares) == 4 if world <= 4 else all(s == 4 for s in shares)


def test_the_order_is_a_function_of_seed_epoch_and_world_size(small_dmelodies):
    stream = StreamSplit(small_dmelodies, "train", buffer=6)
    a = _keys(stream, 1, 3, 0, 2)
    assert a == _keys(stream, 1, 3, 0, 2)                    # a resumed epoch repeats
    assert a != _keys(stream, 1, 4, 0, 2)                    # the next epoch reshuffles
    assert a != _keys(stream, 2, 3, 0, 2)                    # another seed
    assert _keys(stream, 1, 3, 1, 2) != a                    # the other rank reads other clips
    one = sorted(v for b in _keys(stream, 1, 0, 0, 1) for v in b)
    whole = load_dataset(small_dmelodies, splits=["train"])["train"]
    assert one == sorted(round(float(v), 4) for v in whole.features[:, 0, 0])  # every clip once


def test_chunks_read_every_clip_in_manifest_order(small_dmelodies):
    stream = StreamSplit(small_dmelodies, "train")
    whole = load_dataset(small_dmelodies, splits=["train"])["train"]
    parts = list(stream.chunks(6))
    assert [len(p[0]) for p in parts] == [6, 6, 4]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole.features)
    assert torch.equal(torch.cat([p[2] for p in parts]), whole.instrument)


def test_the_memory_budget_decides_and_a_bad_shard_is_named(small_dmelodies, tmp_path):
    assert split_bytes(StreamSplit(small_dmelodies).manifest, "train") == 16 * 251 * 80 * 4
    assert open_dataset(small_dmelodies)["train"].in_memory                 # 1.3 MB < 4 GB
    data = open_dataset(small_dmelodies, memory_budget_mb=1.0)              # 1.3 MB > 1 MB
    assert not data["train"].in_memory and data["val"].in_memory
    assert data.meta["streamed"] == ["train"]
    assert not open_dataset(small_dmelodies, stream="on")["train"].in_memory
    assert open_dataset(small_dmelodies, stream="off", memory_budget_mb=1.0)["train"].in_memory
    bad = tmp_path / "bad"
    shutil.copytree(small_dmelodies, bad)
    shard = sorted(bad.glob("train-*.tar"))[1]
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=shard.name):
        for _ in StreamSplit(bad).chunks(4):
            pass


@pytest.fixture(scope="module")
def streamed_runs(small_dmelodies, tmp_path_factory):
    """TS-DSAE (debug model) on the small dMelodies set, train split streamed: through 4 epochs,
    and cut after 3 then resumed."""
    root = tmp_path_factory.mktemp("stream")

    def cfg(name):
        return apply_overrides(debug(), [f"data.uri={small_dmelodies}", "data.stream=on",
                                         "data.shuffle_buffer=4", "optim.batch_size=6",
                                         "schedule.switch_epoch=2", "schedule.max_epochs=4",
                                         "checkpoint.every=1", f"checkpoint.root={root}",
                                         f"name={name}"])
    through = Trainer(cfg("through"), progress=False)
    assert not through.data["train"].in_memory
    through.fit()
    cut = Trainer(cfg("cut"), progress=False, until=[3])
    cut.fit()
    resumed = Trainer(cfg("cut"), progress=False)
    resumed.fit()
    return through, resumed


def test_a_streamed_run_trains_resumes_bitwise_and_is_evaluated(streamed_runs):
    through, resumed = streamed_runs
    a, b = through.run, resumed.run
    assert [h["epoch"] for h in a.history] == [0, 1, 2, 3]
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in a.history)
    assert [h["val_loss"] for h in a.history] == [h["val_loss"] for h in b.history]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    from tsdsae.evaluate import evaluate

    streamed = evaluate(a.best_model(), through.data, "test")
    in_memory = evaluate(a.best_model(), load_dataset(through.data.meta["uri"]), "test")
    assert streamed == in_memory


def test_a_split_larger_than_the_memory_left_streams_and_is_refused_in_memory(
        small_dmelodies, monkeypatch, capsys):
    """The budget follows the memory this process may use: with 1.5 MB left (as under prlimit
    or a cgroup), the 1.3 MB train split streams under data.stream=auto, and data.stream=off is
    refused before any shard is read, in one line naming the split, what it needs and the fix."""
    import resource

    from tsdsae.data import memory

    held = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    monkeypatch.setattr(memory, "memory_limit_bytes", lambda: held + int(1.5 * 2**20))
    assert not open_dataset(small_dmelodies)["train"].in_memory
    with pytest.raises(memory.DatasetTooLarge, match=r"needs 1 MB in memory .*data.stream=auto"):
        open_dataset(small_dmelodies, stream="off")
    from tsdsae import train

    assert train.main(["--preset", "debug", "--data", str(small_dmelodies), "--quiet",
                       "--no-eval", "--model", "dsae", "data.stream=off", "schedule.max_epochs=1",
                       f"checkpoint.root={small_dmelodies.parent / 'never'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the train split of ")
