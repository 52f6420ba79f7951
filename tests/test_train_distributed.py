"""Data-parallel training for real: torch DistributedDataParallel (gloo) on 2 CPU worker processes,
launched by Ray Train's TorchTrainer on a local Ray started once for this module (2 CPUs), and by
torchrun. The weights after an epoch equal the one-process weights of the same global batches; a
distributed stage run learns like one-process runs do, and its files serve evaluation, export and the next
night's warm start in one process."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bridgerec.models.data import SequenceData
from bridgerec.models.registry import build_model
from bridgerec.models.trainer import FitConfig, LossStep, Ranks, set_seed, train_epoch
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks import StageRun
from bridgerec.tasks.train import TrainSettings
from bridgerec.tasks.train.inputs import load_catalog, load_sequences
from tests.conftest import REPO
from tests.train_data import FAST

pytestmark = pytest.mark.slow  # Ray workers and several small trainings: scheduled first

# No dropout, so the only difference between the runs is where each row's gradient is computed.
EXACT = TrainSettings(model="sasrec", hidden=16, layers=1, heads=1, max_len=20, dropout=0.0, batch_size=128)
CFG = FitConfig(
    lr=5e-3, weight_decay=0.0, batch_size=128, eval_batch_size=512, epochs=1, patience=1, seed=7,
    hide_domain=1.0, loss_norm="batch",
)  # fmt: skip


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    import ray

    env = {"PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    yield
    ray.shutdown()


def _data(root: Path) -> SequenceData:
    ws = Workspace(root)
    return SequenceData(load_catalog(ws), load_sequences(ws), EXACT.max_len)


def _model(data: SequenceData) -> torch.nn.Module:
    set_seed(CFG.seed, False)
    return build_model(EXACT.model_spec(), data.catalog, None)


def _sgd(model: torch.nn.Module) -> Any:
    """Plain SGD (dense and sparse gradients): the weights follow the gradients linearly. Adam would turn
    the float noise of gradients that are zero in exact arithmetic (the attention's key bias) into whole
    steps of the learning rate, in both runs differently."""
    return torch.optim.SGD(model.parameters(), lr=0.5)


def _one_epoch(config: dict[str, Any]) -> None:
    """A Ray Train worker: the same model, this rank's share of every batch, DDP's averaged gradients."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    data = _data(Path(config["workspace"]))
    model = _model(data)
    model.load_state_dict(torch.load(config["start"]))
    ddp = DistributedDataParallel(LossStep(model), find_unused_parameters=True)
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), ddp)
    train_epoch(model, data, _sgd(model), CFG, 1, None, torch.device("cpu"), ranks=ranks)
    if ranks.leader:
        torch.save(model.state_dict(), config["out"])


def test_ddp_weights_equal_one_process_weights(
    ray_cluster: None, sample_workspace: Path, tmp_path: Path
) -> None:
    """One epoch (8 global batches of 128 users, hidden-domain rows included) on 2 gloo ranks through
    Ray Train = the one-process epoch, parameter by parameter, to 1e-5 (sparse ID-embedding gradients
    included)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    torch.set_num_threads(1)
    data = _data(sample_workspace)
    model = _model(data)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(start, tmp_path / "start.pt")
    train_epoch(model, data, _sgd(model), CFG, 1, None, torch.device("cpu"))

    config = {
        "workspace": str(sample_workspace),
        "start": str(tmp_path / "start.pt"),
        "out": str(tmp_path / "ddp.pt"),
    }
    TorchTrainer(
        _one_epoch,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(storage_path=str(tmp_path / "ray-train")),
    ).fit()
    ddp = torch.load(tmp_path / "ddp.pt")
    moved = 0
    for name, one in model.state_dict().items():
        torch.testing.assert_close(ddp[name], one, atol=1e-5, rtol=0, msg=name)
        moved += int(not torch.equal(one, start[name]))
    assert moved >= 3  # the epoch changed the weights


def _train(root: Path, **overrides: Any) -> Any:
    from bridgerec.tasks.train import run_train

    settings = TrainSettings(
        model="sasrec", **(FAST | {"epochs": 3, "patience": 3, "dropout": 0.0} | overrides)
    )
    return run_train(StageRun(settings, Workspace(root), threads=1))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "ingest", dst / "ingest")
    return dst


def test_a_distributed_run_learns_like_one_process_and_its_files_serve(
    ray_cluster: None, sample_workspace: Path, tmp_path: Path
) -> None:
    """The train stage with `data_parallel.workers: 2` on Ray Train: its test NDCG@10 lies within the
    seed-to-seed spread of one-process runs (without dropout it is the one-process figure of its seed:
    the same global batches, the same gradients); its best weights evaluate (the stage does it in one
    process), export for publish, and warm-start the next night's one-process run."""
    from bridgerec.storage.runs import RunDir
    from bridgerec.tasks.train.export import export_vectors

    singles = [_train(_copy(sample_workspace, tmp_path / f"one-{s}"), seed=s) for s in (1, 2)]
    ws = _copy(sample_workspace, tmp_path / "ddp")
    dist = _train(ws, seed=1, data_parallel={"workers": 2})
    figures = np.array([r.test["overall"]["ndcg@10"] for r in singles])
    spread = figures.max() - figures.min()
    got = dist.test["overall"]["ndcg@10"]
    assert figures.min() - spread <= got <= figures.max() + spread, (got, figures)
    assert abs(got - figures[0]) < 1e-4 and dist.best_epoch == singles[0].best_epoch, (got, figures)
    # the test figures are the refit's (train.refit), trained data-parallel too, as the one process's
    assert dist.refit["workers"] == 2 and dist.refit["rates"] == singles[0].refit["rates"]
    run = RunDir(Workspace(ws), dist.run_id)
    assert run.is_complete() and not list(run.path.glob("dp-*"))  # the hand-over files are gone

    vectors = export_vectors(run.path, Workspace(ws))
    assert set(vectors) == {"food", "kitchen"}
    assert all(
        np.isfinite(v.user_vectors).all() and np.isfinite(v.item_vectors).all() for v in vectors.values()
    )

    nxt = _train(ws, seed=1, epochs=4, patience=4)  # another run id: the next night's settings
    assert nxt.init == "warm" and nxt.warm_start_from == dist.run_id


def test_torchrun_launches_the_same_workers_without_ray(sample_workspace: Path, tmp_path: Path) -> None:
    """`launcher: torchrun`: 2 local gloo processes, no Ray; the run completes and evaluates."""
    ws = _copy(sample_workspace, tmp_path / "torchrun")
    summary = _train(ws, seed=1, epochs=1, patience=1, data_parallel={"workers": 2, "launcher": "torchrun"})
    assert summary.epochs == 1 and summary.test["overall"]["ndcg@10"] > 0
    assert summary.refit["workers"] == 2 and summary.refit["epochs"] == 1  # the refit too
    assert (Path(summary.run_dir) / "refit.safetensors").exists()
