"""Training on real cgdms chains: overfitting, resume, atomic checkpoints, NaN / OOM stops, mismatches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from conftest import cgdms_data_dir, tiny_config

from model.diffusion import loss, q_sample
from model.training import (
    EXIT_NAN,
    EXIT_OOM,
    AtomicCheckpointIO,
    CheckpointMismatchError,
    CheckpointNotFiniteError,
    DiffusionModule,
    FaultInjection,
    TrainingStopped,
    TrainOptions,
    build_trainer,
    check_checkpoint,
    load_checkpoint_denoiser,
    run_training,
)
from model.training.stops import NAN_KNOBS, OOM_KNOBS

OVERFIT_STEPS = 120  # optimizer steps on 4 chains (one batch per epoch)
OVERFIT_FACTOR = 1.15  # fixed-noise loss must drop at least this factor (measured ~1.27 at 150 steps)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def chains():
    from model.data.parse import parse_cgdms_file

    root = cgdms_data_dir()
    if root is None:
        pytest.skip("cgdms is not installed (pip install cgdms)")
    parsed = [parse_cgdms_file(f) for f in sorted(root.glob("*.txt"))[:40]]
    picked = [c for c in parsed if 20 <= len(c) <= 45][:6]
    assert len(picked) == 6
    return picked


def _cfg(tmp: Path, **kw):
    base = {"logDirectory": str(tmp), "name": "run", "batchSize": 3, "numEpoches": 2, "learningRate": 3e-3,
                "warmupEpoches": 1, "validationFraction": 0.0, "minimumNumResidues": 20, "maximumNumResidues": 60,
                "logEverySteps": 1, "checkpointEveryEpoches": 1}
    base.update(kw)
    return tiny_config(**base)


def _dm(cfg, chains):
    from model.data.datamodule import ProteinDataModule

    return ProteinDataModule(cfg, chains=chains, verbose=False)


def _opts(**kw):
    return TrainOptions(progress_bar=False, accelerator="cpu", devices="1", **kw)


def test_tiny_model_overfits_real_chains(tmp_path, chains):
    from model.data.datamodule import collate

    cfg = _cfg(tmp_path, batchSize=4, numEpoches=OVERFIT_STEPS, warmupEpoches=0, ipaDropout=0.0,
               structureTransitionDropout=0.0, triangularDropout=0.0, logEverySteps=50,
               checkpointEveryEpoches=1000)
    train = chains[:4]
    pl.seed_everything(0, verbose=False)
    module = DiffusionModule(cfg)
    batch = collate(train)
    g = torch.Generator().manual_seed(1)
    reps = 16  # fixed evaluation set: 64 (chain, t, noise) triples
    t = torch.randint(1, cfg.numTimesteps + 1, (reps * 4,), generator=g)
    x0, mask = batch["x0"].repeat(reps, 1, 1), batch["mask"].repeat(reps, 1)
    eps = torch.randn(x0.shape, generator=g) * mask[..., None]

    def fixed_loss() -> float:
        module.eval()
        with torch.no_grad():
            value = loss(module(q_sample(module.schedule, x0, t, eps, mask), t, mask), eps, mask).item()
        module.train()
        return value

    before = fixed_loss()
    trainer = build_trainer(cfg, _opts(debug=True), tmp_path / "run")  # debug: no loggers
    trainer.limit_train_batches = 1.0
    trainer.fit(module, datamodule=_dm(cfg, train))
    after = fixed_loss()
    assert trainer.global_step == OVERFIT_STEPS
    print(f"overfit: fixed-noise loss {before:.3f} -> {after:.3f} in {OVERFIT_STEPS} steps")
    assert after < before / OVERFIT_FACTOR, (before, after)


def _exp_avgs(state: dict) -> list[torch.Tensor]:
    return [state[k]["exp_avg"].clone() for k in sorted(state)]


def test_resume_continues_step_optimizer_and_scheduler(tmp_path, chains):
    cfg = _cfg(tmp_path)
    first = run_training(cfg, _opts(), datamodule=_dm(cfg, chains))
    ckpt = torch.load(first.last_checkpoint, weights_only=True)
    steps_per_epoch = 2  # 6 chains / batchSize 3
    assert first.global_step == ckpt["global_step"] == 2 * steps_per_epoch
    assert (first.weights_dir / "model.safetensors").is_file()

    seen = {}

    class Capture(pl.Callback):
        def on_train_start(self, trainer, module):
            opt = trainer.optimizers[0]
            seen["step"] = trainer.global_step
            seen["epoch"] = trainer.current_epoch
            seen["exp_avg"] = _exp_avgs({i: opt.state[p] for i, p in enumerate(opt.param_groups[0]["params"])})
            seen["sched"] = trainer.lr_scheduler_configs[0].scheduler.last_epoch

    cfg3 = cfg.replace(numEpoches=3)
    second = run_training(cfg3, _opts(), datamodule=_dm(cfg3, chains), callbacks=[Capture()])
    assert second.resumed_from == first.last_checkpoint
    assert seen["step"] == 4 and seen["epoch"] == 2 and seen["sched"] == 4
    saved = _exp_avgs(ckpt["optimizer_states"][0]["state"])
    assert len(saved) == len(seen["exp_avg"]) > 0
    for a, b in zip(saved, seen["exp_avg"]):
        assert torch.equal(a, b)
    assert second.global_step == 6
    assert any(p.name.startswith("epoch=00002") for p in (tmp_path / "run" / "checkpoints").iterdir())


class _Cadence(pl.Callback):
    """Global steps at which validation ran and at which checkpoints were written."""

    def __init__(self):
        self.validated, self.saved, self.batches_per_epoch = [], [], None

    def on_train_start(self, trainer, module):
        self.batches_per_epoch = trainer.num_training_batches

    def on_validation_end(self, trainer, module):
        self.validated.append(trainer.global_step)

    def on_save_checkpoint(self, trainer, module, checkpoint):
        self.saved.append(trainer.global_step)


@pytest.mark.parametrize("every", [0, 3])
def test_validation_every_steps_counts_batches_across_epochs(tmp_path, chains, every):
    cfg = _cfg(tmp_path, batchSize=2, numEpoches=4, validationFraction=0.3, validationEverySteps=every,
               checkpointEveryEpoches=1000)
    seen = _Cadence()
    result = run_training(cfg, _opts(export_weights=False), datamodule=_dm(cfg, chains), callbacks=[seen])
    per_epoch = seen.batches_per_epoch
    assert per_epoch not in (0, 3) and result.global_step == 4 * per_epoch
    interval = every or per_epoch  # 0: Lightning's default, the end of every epoch
    assert seen.validated == list(range(interval, result.global_step + 1, interval))


@pytest.mark.parametrize("minutes", [0.0, 1000.0])
def test_last_checkpoint_every_minutes_skips_epoch_end_writes_not_the_final_one(tmp_path, chains, minutes):
    cfg = _cfg(tmp_path, numEpoches=3, checkpointEveryEpoches=1000, lastCheckpointEveryMinutes=minutes)
    seen = _Cadence()
    result = run_training(cfg, _opts(export_weights=False), datamodule=_dm(cfg, chains), callbacks=[seen])
    per_epoch = seen.batches_per_epoch
    at_epoch_ends = [per_epoch * (e + 1) for e in range(3)] if minutes == 0 else []
    assert seen.saved == at_epoch_ends + [result.global_step]  # the end of training always writes
    assert torch.load(result.last_checkpoint, weights_only=True)["global_step"] == result.global_step


def test_progress_bar_shows_the_interval_loss_not_a_per_step_metric(tmp_path, chains):
    from model.training.callbacks import IntervalProgressBar

    cfg = _cfg(tmp_path, numEpoches=2, logEverySteps=3)
    seen = {}

    class Grab(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):  # what steps 1..k left shown
            seen.setdefault("shown", []).append(dict(module.progress_metrics))

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.setdefault("losses", []).append(float(outputs["loss"]))

        def on_train_end(self, trainer, module):
            seen["bar_metrics"] = dict(trainer.progress_bar_metrics)
            seen["bar"] = IntervalProgressBar().get_metrics(trainer, module)

    run_training(cfg, _opts(export_weights=False), datamodule=_dm(cfg, chains), callbacks=[Grab()])
    assert not any(k.startswith("train/loss") for k in seen["bar_metrics"])  # no per-step .item()
    losses, shown = seen["losses"], seen["shown"]
    assert len(losses) == 4 and shown[:3] == [{}, {}, {}]  # before steps 1-3: no log interval yet
    assert shown[3] == {"loss": pytest.approx(losses[2])}  # read at step 3 (logEverySteps)
    assert seen["bar"]["loss"] == pytest.approx(losses[2])  # kept through step 4


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.arange(5.0)}, path)
    real_save = torch.save

    def crash(obj, f, *a, **k):  # half a file, then the process "dies"
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("simulated crash mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="mid-write"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(5)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    back = torch.load(path, weights_only=True)
    assert back["global_step"] == 1 and torch.equal(back["w"], torch.arange(5.0))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind
    trainer = build_trainer(_cfg(tmp_path), _opts(), tmp_path / "run")
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def _pickled_globals(path: Path) -> set[str]:
    """'module name' of every class or function the pickle of a ``torch.save`` file refers to."""
    import pickletools
    import zipfile

    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":  # protocol 2: the argument is "module name"
            found.add(arg)
        elif op.name == "STACK_GLOBAL":  # protocol 4: module and name are the last two strings pushed
            found.add(" ".join(strings[-2:]))
        elif isinstance(arg, str):
            strings.append(arg)
    return found


def test_checkpoint_stores_no_module_path_of_the_project(tmp_path, chains):
    """A .ckpt pickles tensors and plain containers only, and no callback state (Lightning would file it
    under the callback's class name): where the training code lives is not in the file, so checkpoints
    written before a module moved or was renamed still load and resume."""
    cfg = _cfg(tmp_path, numEpoches=1)
    result = run_training(cfg, _opts(export_weights=False), datamodule=_dm(cfg, chains))
    modules = {g.split()[0].split(".")[0] for g in _pickled_globals(result.last_checkpoint)}
    assert modules <= {"collections", "torch"}, modules
    ckpt = torch.load(result.last_checkpoint, weights_only=True)
    assert ckpt["callbacks"] == {} and "hyper_parameters" not in ckpt
    assert all(k.startswith("denoiser.") for k in ckpt["state_dict"])
    torch.save({"fault": FaultInjection("nan", 1)}, tmp_path / "object.pt")  # the check sees a pickled class
    assert "model.training.stops FaultInjection" in _pickled_globals(tmp_path / "object.pt")


def test_nan_loss_stops_cleanly_with_last_good_checkpoint(tmp_path, chains):
    cfg = _cfg(tmp_path, nanPolicy="stop", numEpoches=5)
    with pytest.raises(TrainingStopped) as info:
        run_training(cfg, _opts(fault=FaultInjection("nan", 3)), datamodule=_dm(cfg, chains))
    stop = info.value
    assert stop.exit_code == EXIT_NAN
    text = str(stop)
    for key in NAN_KNOBS:
        assert f"{key} {getattr(cfg, key)}" in text
    assert "nanPolicy skip" in text and str(stop.checkpoint) in text
    assert "the first in optimizer step 3 (counting from 0), detected at step 4" in text
    ckpt = torch.load(stop.checkpoint, weights_only=True)
    assert ckpt["global_step"] == 4  # detected right after step index 3
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    # the NaN step was not applied: AdamW counted 3 real steps
    assert all(float(s["step"]) == 3 for s in ckpt["optimizer_states"][0]["state"].values())
    assert not (tmp_path / "run" / "weights").exists()  # no export of an unfinished run


def test_nan_loss_skip_policy_skips_and_counts(tmp_path, chains):
    cfg = _cfg(tmp_path, nanPolicy="skip")
    result = run_training(cfg, _opts(fault=FaultInjection("nan", 1)), datamodule=_dm(cfg, chains))
    ckpt = torch.load(result.last_checkpoint, weights_only=True)
    assert result.global_step == 4
    assert all(float(s["step"]) == 3 for s in ckpt["optimizer_states"][0]["state"].values())
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    import csv

    with open(next((tmp_path / "run" / "csv").glob("*/metrics.csv"))) as fh:
        rows = list(csv.DictReader(fh))
    counts = [float(r["train/nonfinite_steps"]) for r in rows if r.get("train/nonfinite_steps")]
    assert counts and counts[-1] == 1.0


def test_cuda_oom_saves_checkpoint_and_names_knobs(tmp_path, chains):
    cfg = _cfg(tmp_path, numEpoches=3)
    with pytest.raises(TrainingStopped) as info:
        run_training(cfg, _opts(fault=FaultInjection("oom", 2)), datamodule=_dm(cfg, chains))
    stop = info.value
    assert stop.exit_code == EXIT_OOM
    for key in OOM_KNOBS:
        assert f"{key} {getattr(cfg, key)}" in str(stop)
    ckpt = torch.load(stop.checkpoint, weights_only=True)
    assert ckpt["global_step"] == 2
    # the saved state resumes (lower batchSize is allowed on resume)
    cfg2 = cfg.replace(batchSize=2)
    result = run_training(cfg2, _opts(), datamodule=_dm(cfg2, chains))
    assert result.resumed_from == stop.checkpoint and result.global_step > 2


def test_mismatched_checkpoint_names_key_or_tensor(tmp_path, chains):
    cfg = _cfg(tmp_path, numEpoches=1)
    first = run_training(cfg, _opts(), datamodule=_dm(cfg, chains))
    other = cfg.replace(useMHCMode=True, numEpoches=2)
    with pytest.raises(CheckpointMismatchError, match=r"useMHCMode: checkpoint False, config True"):
        run_training(other, _opts(resume=str(first.last_checkpoint)), datamodule=_dm(other, chains))
    ckpt = torch.load(first.last_checkpoint, weights_only=True)
    module = DiffusionModule(cfg)
    name = next(k for k, v in ckpt["state_dict"].items() if v.ndim == 2)
    shape = tuple(ckpt["state_dict"][name].shape)
    ckpt["state_dict"][name] = torch.zeros(shape[0] + 1, shape[1])
    with pytest.raises(CheckpointMismatchError, match=rf"tensor '{name}': checkpoint \({shape[0] + 1}, "):
        check_checkpoint(ckpt, cfg, module.state_dict(), "tampered.ckpt")
    denoiser = load_checkpoint_denoiser(first.last_checkpoint)
    assert denoiser.config == cfg.replace(numEpoches=1)


def test_non_finite_checkpoint_is_refused_naming_the_tensor(tmp_path, chains):
    """A checkpoint with NaN / Inf in a weight or in the optimizer state is refused on resume (it could only
    stop at the first step), naming where; a finite one passes the same check."""
    cfg = _cfg(tmp_path, numEpoches=1)
    first = run_training(cfg, _opts(), datamodule=_dm(cfg, chains))
    module = DiffusionModule(cfg)
    ckpt = torch.load(first.last_checkpoint, weights_only=True)
    check_checkpoint(ckpt, cfg, module.state_dict(), "good.ckpt")  # finite: no error
    state = ckpt["optimizer_states"][0]["state"]
    pid = next(iter(state))
    state[pid]["exp_avg_sq"].view(-1)[0] = float("inf")
    with pytest.raises(CheckpointNotFiniteError, match=rf"optimizer 0 state 'exp_avg_sq' of parameter {pid}"):
        check_checkpoint(ckpt, cfg, module.state_dict(), "bad.ckpt")
    state[pid]["exp_avg_sq"].view(-1)[0] = 0.0
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][name].view(-1)[0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.ckpt")
    with pytest.raises(CheckpointNotFiniteError, match=rf"weight '{name}'.*earlier checkpoint"):
        run_training(cfg.replace(numEpoches=2), _opts(resume=str(tmp_path / "nan.ckpt")), datamodule=_dm(cfg, chains))


KILL_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from model.data.parse import parse_cgdms_file
from model.data.datamodule import ProteinDataModule
from model.training import run_training, TrainOptions
from pathlib import Path
files = sorted(Path({root!r}).glob("*.txt"))[:40]
chains = [c for c in (parse_cgdms_file(f) for f in files) if 20 <= len(c) <= 45][:6]
cfg = tiny_config(logDirectory={log!r}, name="run", batchSize=3, numEpoches=10000, validationFraction=0.0,
                  minimumNumResidues=20, maximumNumResidues=60, logEverySteps=1, checkpointEveryEpoches=1)
run_training(cfg, TrainOptions(progress_bar=False, accelerator="cpu", devices="1"),
             datamodule=ProteinDataModule(cfg, chains=chains, verbose=False))
"""


@pytest.mark.slow
def test_kill_9_during_training_then_resume(tmp_path, chains):
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), root=str(cgdms_data_dir()), log=str(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and len(list(ckpt_dir.glob("epoch=*.ckpt"))) < 3:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # mid-training, possibly mid-write
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=True)  # readable, never half-written
    step = ckpt["global_step"]
    assert step >= 4
    cfg = tiny_config(logDirectory=str(tmp_path), name="run", batchSize=3, numEpoches=ckpt["epoch"] + 2,
                      validationFraction=0.0, minimumNumResidues=20, maximumNumResidues=60, logEverySteps=1,
                      checkpointEveryEpoches=1)
    result = run_training(cfg, _opts(), datamodule=_dm(cfg, chains))
    assert result.resumed_from == ckpt_dir / "last.ckpt"
    assert result.global_step == step + 2  # one more epoch of 2 steps


def test_stretch_time_limit_stops_all_ddp_ranks_at_the_same_batch():
    """With several ranks the time check runs every sync_every batches on every rank and is reduced
    (any rank over time stops all), so no rank waits alone in the next all-reduce."""
    from types import SimpleNamespace

    from model.training.callbacks import StretchTimeLimit

    calls = []

    def reduce(decision, all=True):  # Lightning's Strategy.reduce_boolean_decision; rank 1 is over time
        calls.append((decision, all))
        return decision or True

    trainer = SimpleNamespace(world_size=2, should_stop=False,
                              strategy=SimpleNamespace(reduce_boolean_decision=reduce))
    limit = StretchTimeLimit(minutes=60.0, sync_every=5)
    limit.on_train_start(trainer, None)
    for _ in range(4):
        limit.on_train_batch_end(trainer)
    assert calls == [] and not trainer.should_stop  # no collective between sync points
    limit.on_train_batch_end(trainer)
    assert calls == [(False, False)] and trainer.should_stop  # this rank is in time; another was not

    single = SimpleNamespace(world_size=1, should_stop=False, strategy=None)
    limit = StretchTimeLimit(minutes=0.0)
    limit.on_train_start(single, None)
    limit.on_train_batch_end(single)
    assert single.should_stop  # one process: checked every batch, no collective


def test_last_checkpoint_minutes_follow_rank_zeros_clock_under_ddp(tmp_path):
    """Saving is collective under DDP (a barrier inside), so whether last.ckpt is due at an epoch's end is
    rank 0's decision, broadcast; a rank whose own clock says otherwise follows it."""
    from types import SimpleNamespace

    from model.training.callbacks import EpochCheckpoint

    saved, broadcasts = [], []

    def broadcast(obj, src=0):  # Lightning's Strategy.broadcast; rank 0 says: not due
        broadcasts.append((obj, src))
        return False

    trainer = SimpleNamespace(current_epoch=0, global_step=10, sanity_checking=False,
                              strategy=SimpleNamespace(broadcast=broadcast), save_checkpoint=saved.append)
    module = SimpleNamespace(stop_reason=None)
    ckpt = EpochCheckpoint(tmp_path, every=1000, last_minutes=1e-9)  # this rank: due at once
    ckpt.on_train_start(trainer, module)
    ckpt.on_train_epoch_end(trainer, module)
    assert broadcasts == [(True, 0)] and saved == []
    every_epoch = EpochCheckpoint(tmp_path, every=1000)  # 0 minutes: every epoch, no collective needed
    every_epoch.on_train_start(trainer, module)
    every_epoch.on_train_epoch_end(trainer, module)
    assert saved == [tmp_path / "last.ckpt"] and len(broadcasts) == 1
