"""Data-parallel training (`train.data_parallel.workers` > 1): torch DistributedDataParallel over N worker
processes, launched by Ray Train's `TorchTrainer` on the run's Ray cluster (`launcher: ray`) or by
`torchrun` on this machine (`launcher: torchrun`, no Ray); gloo on CPU, NCCL on GPUs.

The driver (the train stage) decides the start as always (resume, warm or cold), writes it to the run
folder (`dp-start.pt`: weights, loop state, optimizer state) and launches the workers. Each worker loads
the run's inputs from the workspace (which every worker must see), builds the same model, takes the start
weights and trains its share of every global batch (models/trainer.py: `Ranks`). Rank 0 validates, keeps
the best weights and the checkpoint in the run folder as a one-process run does, and writes the final loop
state (`dp-result.pt`); the driver then evaluates the best weights in one process. The refit
(`train.refit`, tasks/train/refit.py) goes the same way with `refit_rates` set: the workers train those
epochs through the validation targets and rank 0 hands the weights back in `dp-result.pt`. So evaluation, export,
resume and the next night's warm start read a distributed run's files like any other's.

Under torchrun directly: `torchrun --standalone --nproc-per-node=2 -m bridgerec.tasks.train.distributed JOB.json`
(JOB.json: a `DataParallelJob`, which the stage writes to the run folder as `dp-job.json`).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from bridgerec.models.registry import build_model
from bridgerec.models.trainer import FitState, LossStep, Ranks, fit, set_seed, train_schedule
from bridgerec.storage.runs import RunDir
from bridgerec.storage.workspace import Workspace
from bridgerec.tasks.context import StageRun
from bridgerec.tasks.train.checkpoint import save_checkpoint, save_weights
from bridgerec.tasks.train.settings import TrainSettings

START_FILE, RESULT_FILE, JOB_FILE = "dp-start.pt", "dp-result.pt", "dp-job.json"


class DataParallelFailed(RuntimeError):
    """The workers of a data-parallel run failed (their error is in the message and the logs)."""


class DataParallelJob(BaseModel):
    """What every worker needs to train its share (small: the weights travel through the run folder)."""

    settings: TrainSettings
    workspace: str
    run_id: str
    threads: int  # torch threads per worker
    warm: bool  # the warm limits apply (settings.fit_config(warm=...))
    init: dict[str, Any]  # the run's init record, kept in every checkpoint
    # train.refit: train these epochs' rates through the validation targets (tasks/train/refit.py)
    # instead of the selection loop; rank 0 hands the weights back in dp-result.pt.
    refit_rates: list[float] | None = None

    @property
    def run_dir(self) -> RunDir:
        return RunDir(Workspace(self.workspace), self.run_id)


def _device(settings: TrainSettings) -> torch.device:
    if settings.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def fit_worker(job: DataParallelJob) -> None:
    """One rank: the group is set up by the launcher (Ray Train), or here from torchrun's environment."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from bridgerec.tasks.train.inputs import load_inputs

    settings = job.settings
    device = _device(settings)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    ranks = Ranks(dist.get_rank(), dist.get_world_size())
    torch.set_num_threads(job.threads)
    set_seed(settings.seed, settings.deterministic)
    run = StageRun(settings, Workspace(job.workspace), threads=job.threads)
    inputs = load_inputs(run)
    model = build_model(settings.model_spec(**inputs.widths), inputs.catalog, inputs.tables).to(device)
    run_dir = job.run_dir
    start = torch.load(run_dir.path / START_FILE, map_location=device, weights_only=False)
    model.load_state_dict(start["model"])
    torch.manual_seed(settings.seed * 1_000 + ranks.rank)  # each rank's rows draw their own dropout masks
    data = inputs.data
    if job.refit_rates is not None:  # held-out new items stay out of the refit's targets
        data = data.through_validation(inputs.cold_eval.held.held if inputs.cold_eval.held else None)
    model.set_trained_items(data.item_counts("train"))
    ids = [device.index] if device.type == "cuda" else None
    ddp = DistributedDataParallel(LossStep(model), device_ids=ids, find_unused_parameters=True)
    ranks = dataclasses.replace(ranks, ddp=ddp)
    if job.refit_rates is not None:
        cfg = settings.fit_config(warm=job.warm)
        log = run.log.info if ranks.leader else (lambda _: None)
        train_schedule(model, data, job.refit_rates, cfg, device, inputs.profiles, log, ranks)
        if ranks.leader:
            torch.save(
                {k: v.detach().cpu() for k, v in model.state_dict().items()}, run_dir.path / RESULT_FILE
            )
        dist.barrier()
        return
    valid = data.eval_split("valid", settings.eval_negatives, settings.seed, settings.short_history)

    def on_epoch(m: Any, opt: Any, st: FitState, is_best: bool) -> None:
        if is_best:
            save_weights(m, run_dir)
        save_checkpoint(run_dir, m, opt, st, job.init)

    state = start["state"]
    state = fit(
        model, data, valid, settings.fit_config(warm=job.warm), device, inputs.profiles,
        FitState(**state) if state is not None else None, start["optimizer"],
        on_epoch if ranks.leader else None, log=run.log.info if ranks.leader else lambda _: None, ranks=ranks,
    )  # fmt: skip
    if ranks.leader:
        torch.save(dataclasses.asdict(state), run_dir.path / RESULT_FILE)
    dist.barrier()


def _ray_worker(config: dict[str, Any]) -> None:
    fit_worker(DataParallelJob.model_validate_json(config["job"]))


def launch(job: DataParallelJob, model: Any, state: FitState | None, optimizer: Any) -> FitState:
    """Train `model` (its start weights) data-parallel as `job.settings.data_parallel` says; the final
    loop state. The best weights and the checkpoint are in the run folder, as after `fit`."""
    start = {"model": model.state_dict(), "state": dataclasses.asdict(state) if state is not None else None}
    return FitState(**_run_workers(job, start | {"optimizer": optimizer}))


def launch_refit(job: DataParallelJob, model: Any) -> None:
    """Train the refit of `model` (its start weights; `job.refit_rates` set) data-parallel; its weights
    are loaded back into `model`."""
    model.load_state_dict(_run_workers(job, {"model": model.state_dict(), "state": None, "optimizer": None}))


def _run_workers(job: DataParallelJob, start: dict[str, Any]) -> Any:
    """Hand `start` to the workers (dp-start.pt), run them with the job's launcher and return what rank 0
    handed back (dp-result.pt); neither file is left behind."""
    run_dir, dp = job.run_dir, job.settings.data_parallel
    torch.save(start, run_dir.path / START_FILE)
    (run_dir.path / RESULT_FILE).unlink(missing_ok=True)
    try:
        if dp.launcher == "torchrun":
            _torchrun(job, dp.workers)
        else:
            _ray_train(job, dp.workers, dp.cpus_per_worker)
        return torch.load(run_dir.path / RESULT_FILE, weights_only=False)
    finally:
        (run_dir.path / START_FILE).unlink(missing_ok=True)
        (run_dir.path / RESULT_FILE).unlink(missing_ok=True)


def _torchrun(job: DataParallelJob, workers: int) -> None:
    path = job.run_dir.path / JOB_FILE
    path.write_text(job.model_dump_json())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}"]
    cmd += ["-m", "bridgerec.tasks.train.distributed", str(path)]
    env = os.environ | {"OMP_NUM_THREADS": str(job.threads)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise DataParallelFailed(f"torchrun exited with {done.returncode}: {done.stderr[-2000:]}")


def _ray_train(job: DataParallelJob, workers: int, cpus: float) -> None:
    """Ray Train's TorchTrainer on the cluster this process is connected to (or a local Ray)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpu = job.settings.device != "cpu" and torch.cuda.is_available()
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"job": job.model_dump_json()},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu, resources_per_worker={"CPU": cpus}),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(
            name=f"{'refit' if job.refit_rates is not None else 'train'}-{job.run_id}",
            storage_path=str(job.run_dir.path / "ray-train"),
        ),
    )
    try:
        trainer.fit()
    except Exception as exc:  # Ray Train's TrainingFailedError wraps the worker's error
        raise DataParallelFailed(f"Ray Train: {exc}") from exc


def main(argv: list[str] | None = None) -> None:
    """torchrun's entry: `python -m bridgerec.tasks.train.distributed JOB.json` in every rank."""
    args = argv if argv is not None else sys.argv[1:]
    fit_worker(DataParallelJob.model_validate_json(Path(args[0]).read_text()))


if __name__ == "__main__":
    main()
