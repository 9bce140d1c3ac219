"""A Ray cluster of two nodes on this machine (ray.cluster_utils.Cluster, 1 CPU each), data and
runs on the S3 server at ENDPOINT: the dMelodies preparation spread over both nodes, then a
two-worker DDP training that streams its train split, one worker on each node, with one worker
killed once (the group restarts and resumes from the run's last.pt).

    python tests/two_node_cluster.py ENDPOINT BUCKET WORKDIR        (prints one JSON line)

Run by tests/test_cluster_two_nodes.py in its own process: it starts its own Ray cluster beside
the test session's.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


class NodeOfRank:
    """Epoch callback: records each rank's node id; kills rank 1's worker once after `kill_at`."""

    def __init__(self, folder: str, kill_at: int):
        self.folder, self.kill_at = folder, kill_at

    def __call__(self, record: dict, rank: int) -> None:
        import ray

        node = ray.get_runtime_context().get_node_id()
        with open(Path(self.folder) / f"rank{rank}-epoch{record['epoch']}", "w") as f:
            f.write(node)
        if rank == 1 and record["epoch"] == self.kill_at:
            try:
                open(Path(self.folder) / "killed", "x").close()
            except FileExistsError:
                return
            os.kill(os.getpid(), signal.SIGKILL)


def main(endpoint: str, bucket: str, workdir: str) -> dict:
    import ray
    import ray.cloudpickle
    from ray.cluster_utils import Cluster

    from conftest import SMALL_DMELODIES
    from data_prep.dmelodies import prepare_dmelodies
    from data_prep.parallel import Executor
    from tsdsae.config import apply_overrides, debug
    from tsdsae.ray_train import driver_config, runtime_env, train_driver_fn
    from tsdsae.storage import open_store

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # NodeOfRank
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1}, connect=False)
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env=runtime_env(), configure_logging=False,
             log_to_driver=False)
    out: dict = {"nodes": len([n for n in ray.nodes() if n["Alive"]])}
    try:
        data_uri = f"s3://{bucket}/data/small"
        with Executor(ray_address=cluster.address) as executor:
            out["executor"] = executor.describe()
            prepare_dmelodies(data_uri, endpoint_url=endpoint, executor=executor,
                              **SMALL_DMELODIES)
        store = open_store(data_uri, endpoint)
        out["shards"] = {name: hashlib.sha256(store.read_bytes(name)).hexdigest()
                         for name in store.list() if name.endswith(".tar")}
        out["manifest"] = json.loads(store.read_bytes("dataset.json"))
        marks = Path(workdir) / "marks"
        marks.mkdir()
        cfg = apply_overrides(debug(), [
            f"data.uri={data_uri}", f"data.endpoint_url={endpoint}", "data.stream=on",
            "data.shuffle_buffer=4", "optim.batch_size=6", "schedule.switch_epoch=2",
            "schedule.max_epochs=4", "checkpoint.every=1", f"checkpoint.root=s3://{bucket}/runs",
            "name=two-nodes"])
        summary = train_driver_fn(driver_config(cfg, num_workers=2, cpus_per_worker=1,
                                                max_failures=2, evaluate=True),
                                  epoch_callbacks=[NodeOfRank(str(marks), kill_at=2)])
        out["summary"] = {k: summary[k] for k in ("epochs_run", "best_epoch", "run_dir")}
        out["eval"] = {k: summary["eval"][k] for k in ("pre_swap", "gswap", "lswap")}
        out["killed"] = (marks / "killed").exists()
        out["nodes_of_ranks"] = {p.name: p.read_text() for p in sorted(marks.iterdir())
                                 if p.name.startswith("rank")}
    finally:
        ray.shutdown()
        cluster.shutdown()
    return out


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
