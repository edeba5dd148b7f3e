"""Ready for CUDA, checked on the CPU (issue 23): state on the weights' device, no host syncs on
the training step, a resume that tolerates fewer GPUs, ranks that stop together."""

from __future__ import annotations

import io
import sys
import time
from contextlib import redirect_stderr
from pathlib import Path

import pytest
import torch
from helpers import Killer, free_port, pretend_torchrun
from torch import nn

import qatlab
from qatlab import models
from qatlab.methods import METHODS, build_hooks, list_methods
from qatlab.train import RunConfig, TrainConfig, fit
from qatlab.train.loop import build_optimizer, train_step

QATLAB_DIR = str(Path(qatlab.__file__).parent)


def _cnn(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    x, y = torch.randn(16, 1, 40), torch.randint(0, 10, (16,))
    model = models.create("cnn1d", 10, (1, 40))
    return model, x, y


def _tensors(obj, seen: set[int] | None = None, depth: int = 0):
    """Every tensor reachable from ``obj``'s attributes, module buffers and optimizer state."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 4:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
        return
    if isinstance(obj, nn.Module):
        yield from obj.buffers()
        yield from obj.parameters()
    if isinstance(obj, torch.optim.Optimizer):
        for state in obj.state.values():  # torch keeps Adam's "step" on the CPU by design
            yield from (v for k, v in state.items() if k != "step" and torch.is_tensor(v))
        return
    items = (
        obj.values()
        if isinstance(obj, dict)
        else obj
        if isinstance(obj, (list, tuple))
        else vars(obj).values()
        if hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type))
        else ()
    )
    for value in items:
        if isinstance(value, (torch.Tensor, dict, list, tuple, torch.optim.Optimizer)) or (
            hasattr(value, "__dict__") and type(value).__module__.startswith("qatlab")
        ):
            yield from _tensors(value, seen, depth + 1)
    if isinstance(obj, nn.Module):
        for value in vars(obj).values():  # plain attributes of hook modules (e.g. wrappers)
            if hasattr(value, "__dict__") and type(value).__module__.startswith("qatlab"):
                yield from _tensors(value, seen, depth + 1)


# ----------------------------------------------------------------------------- 1: devices
@pytest.mark.parametrize(
    "method",
    list_methods(),
)
def test_every_method_keeps_its_state_on_the_weights_device(method):
    """Model on ``meta`` (no data; any op mixing devices or reading a value raises): build the
    method's hooks and optimizer, take three steps, and every buffer and state tensor the
    hooks, wrappers and optimizers hold is on ``meta`` too."""
    spec = METHODS[method]
    model, x, y = _cnn()
    quant = None
    if spec.needs_quant is not False:
        quant = qatlab.QuantConfig(weight_bits=4, act_bits=4)
        model = qatlab.quantize(model, quant)
        qatlab.calibrate(model, [x])
    model.to("meta")
    options = {k: 0.0 for k in ("start",) if k in spec.options}  # freezing/dampening active
    if "log_every" in spec.options:  # no logging step among the three (logging reads values)
        options["log_every"] = 1000
    hooks = build_hooks(method, options, model, quant, total_steps=4)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-3).validate(), hooks)
    for step in range(3):
        train_step(model, x.to("meta"), y.to("meta"), optimizer, hooks, step, 4)
    held = list(_tensors(hooks)) + list(_tensors(optimizer))
    assert len(held) > sum(1 for _ in model.parameters())  # the optimizer state at least
    wrong = {tuple(t.shape): t.device for t in held if t.device.type != "meta"}
    assert not wrong, f"{method}: tensors off the weights' device: {wrong}"


def test_tracker_and_freezer_buffers_follow_the_weights():
    from qatlab.methods.oscillation import IterativeFreezing, OscillationTracker

    model, x, _ = _cnn()
    model = qatlab.quantize(model, qatlab.QuantConfig(weight_bits=4, act_bits=4))
    qatlab.calibrate(model, [x])
    model.to("meta")
    for hook in (OscillationTracker(model), IterativeFreezing(model, start=0.0)):
        buffers = dict(hook.named_buffers())
        assert any(k.endswith("__freq") for k in buffers)
        assert {b.device.type for b in buffers.values()} == {"meta"}


def test_augmentation_and_batches_on_the_loader_device():
    """Batches gathered and augmented on the requested device (CropFlip's indices and flip mask
    are made there); on the CPU the numbers equal those of the plain loader."""
    from qatlab.data import ArrayDataset, make_loader
    from qatlab.data.augment import CropFlip

    torch.manual_seed(0)
    ds = ArrayDataset(torch.randn(20, 3, 8, 8), torch.arange(20) % 10, CropFlip(padding=2))
    plain = list(make_loader(ds, 8, shuffle=True, seed=3, epoch=1))
    on_cpu = list(make_loader(ds, 8, shuffle=True, seed=3, epoch=1, device="cpu"))
    assert len(plain) == len(on_cpu) == 3
    for (xa, ya), (xb, yb) in zip(plain, on_cpu, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(plain[0][0], ds.x[:8])  # it did augment
    meta = list(make_loader(ds, 8, shuffle=True, seed=3, epoch=1, device="meta"))
    assert [tuple(x.shape) for x, _ in meta] == [(8, 3, 8, 8), (8, 3, 8, 8), (4, 3, 8, 8)]
    assert {x.device.type for x, _ in meta} | {y.device.type for _, y in meta} == {"meta"}


# ----------------------------------------------------------------------------- 2: host syncs
class SyncCounter:
    """Counts host-device syncs made by qatlab code (the calling frame is in the package):
    ``item``, ``__float__``, ``__int__``, ``__bool__``, ``tolist``, ``cpu`` and boolean-mask
    indexing, bucketed by the training step being run (``loop.train_step``'s ``step``)."""

    NAMES = ("item", "__float__", "__int__", "__bool__", "tolist", "cpu")

    def __init__(self, monkeypatch) -> None:
        import qatlab.train.loop as loop

        self.step = -1
        self.counts: dict[int, list[str]] = {}
        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), name))
        for name in ("__getitem__", "__setitem__"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap_index(original, name))
        original_step = loop.train_step

        def stepping(*args, **kwargs):
            self.step = args[5] if len(args) > 5 else kwargs.get("step", 0)
            return original_step(*args, **kwargs)

        monkeypatch.setattr(loop, "train_step", stepping)

    # CPU-only paths, where reading a value is no host-device sync: the LSQ kernel's read of a
    # per-tensor step (its fast path, taken only for CPU tensors) and the step-size guard's
    # per-step check (on an accelerator it reads its hits every ACCEL_CHECK_EVERY steps; the
    # meta-device test above runs that path and would raise on any read)
    CPU_ONLY = {("quantizer.py", "_cpu_step"), ("guard.py", "_check_all"), ("guard.py", "_check")}

    def _record(self, name: str) -> None:
        caller = sys._getframe(2)
        if (Path(caller.f_code.co_filename).name, caller.f_code.co_name) in self.CPU_ONLY:
            return
        if caller.f_code.co_filename.startswith(QATLAB_DIR):
            where = f"{name} at {Path(caller.f_code.co_filename).name}:{caller.f_lineno}"
            self.counts.setdefault(self.step, []).append(where)

    def _wrap(self, original, name: str):
        def wrapped(tensor, *args, **kwargs):
            self._record(name)
            return original(tensor, *args, **kwargs)

        return wrapped

    def _wrap_index(self, original, name: str):
        def wrapped(tensor, index, *args):
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                self._record(f"boolean {name}")
            return original(tensor, index, *args)

        return wrapped


LOG_EVERY = 4


@pytest.mark.parametrize(
    "method, options",
    [
        ("qat", {}),
        ("track", {"log_every": LOG_EVERY}),
        ("dampen", {"log_every": LOG_EVERY, "start": 0.0}),
        # every weight that oscillates once freezes: the masked path does real work
        (
            "freeze",
            {
                "log_every": LOG_EVERY,
                "start": 0.0,
                "momentum": 0.5,
                "threshold_start": 1e-6,
                "threshold_end": 1e-6,
            },
        ),
        ("saq", {}),
        ("talr", {"log_every": LOG_EVERY}),
    ],
)
def test_no_host_sync_on_training_steps_outside_logging(
    method, options, tiny_data_config, tmp_path, monkeypatch
):
    """One epoch of ``fit``: steps whose number is not a multiple of ``log_every`` (where the
    loop logs and checks divergence, and hooks log) make no host-device sync at all."""
    from qatlab.train.runner import build

    torch.set_num_threads(1)
    cfg = RunConfig.from_dict(
        {
            "name": method,
            "out_dir": str(tmp_path),
            "data": tiny_data_config,
            "model": {"name": "cnn1d"},
            "quant": {"weight_bits": 4, "act_bits": 4},
            "method": {"name": method, **options},
            "train": {
                "epochs": 1,
                "batch_size": 64,
                "device": "cpu",
                "progress": False,
                "log_every": LOG_EVERY,
            },
        }
    )
    model, data, hooks = build(cfg)
    counter = SyncCounter(monkeypatch)
    fit(model, data, cfg.train, hooks=hooks)
    monkeypatch.undo()
    steps = len(data.train) // 64
    logging = {s for s in range(steps) if (s + 1) % LOG_EVERY == 0}
    assert counter.counts.get(LOG_EVERY - 1)  # the counter sees the logging steps' syncs
    quiet = {
        s: where
        for s, where in counter.counts.items()
        if 0 <= s < steps - 1 and s not in logging  # the last step: the epoch's end follows
    }
    assert not quiet, f"{method}: host syncs on non-logging steps: {quiet}"
    if method == "freeze":
        assert hooks[0].frozen_share() > 0.01  # some weights froze: the masked path ran


# ----------------------------------------------------------------------------- 3: RNG state
class FakeCuda:
    """``n`` pretend GPUs: generator states kept per index; an index past ``n`` raises like
    CUDA does."""

    def __init__(self, monkeypatch, n: int) -> None:
        self.n = n
        self.states: dict[int, torch.Tensor] = {i: torch.full((16,), i, dtype=torch.uint8)
                                                for i in range(n)}  # fmt: skip
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.n)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)

    def _index(self, device) -> int:
        index = torch.device("cuda", device).index if isinstance(device, int) else device
        index = 0 if index in (None, "cuda") else index
        if not 0 <= index < self.n:
            raise IndexError(f"CUDA device {index} out of range ({self.n} visible)")
        return index

    def get(self, device="cuda") -> torch.Tensor:
        return self.states[self._index(device)].clone()

    def set(self, state: torch.Tensor, device="cuda") -> None:
        self.states[self._index(device)] = state.clone()


def test_rng_state_of_eight_gpus_restores_on_two(monkeypatch):
    from qatlab.train.checkpoint import rng_state, set_rng_state

    FakeCuda(monkeypatch, 8)
    saved = rng_state()
    assert len(saved["cuda"]) == 8
    saved["cuda"] = [torch.full((16,), 100 + i, dtype=torch.uint8) for i in range(8)]
    fewer = FakeCuda(monkeypatch, 2)
    set_rng_state(saved)  # was IndexError: every saved generator restored, 8 of them
    assert [int(fewer.states[i][0]) for i in range(2)] == [100, 101]
    more = FakeCuda(monkeypatch, 3)
    set_rng_state({**saved, "cuda": saved["cuda"][:1]})  # fewer saved than visible
    assert [int(more.states[i][0]) for i in range(3)] == [100, 1, 2]


def test_resume_of_a_checkpoint_listing_more_gpus_than_exist(tiny_data, tmp_path, monkeypatch):
    """A run killed after epoch 1, its ckpt.pt edited to hold 8 CUDA generator states, resumes
    with one (pretend) GPU visible and ends with the weights of an uninterrupted run."""
    from qatlab.train.checkpoint import load_checkpoint, save_checkpoint

    torch.set_num_threads(1)
    cfg = TrainConfig(epochs=2, batch_size=64, lr=3e-3, progress=False, device="cpu")

    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return models.create("mlp5", tiny_data.num_classes, tiny_data.input_shape)

    whole = fresh()
    steps = fit(whole, tiny_data, cfg, hooks=[Killer(None)])["steps"] // 2
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):  # killed in epoch 2: ckpt.pt holds epoch 1
        fit(fresh(), tiny_data, cfg, hooks=[Killer(steps + 2)], run_dir=run)
    ckpt = load_checkpoint(run / "ckpt.pt")
    ckpt["rng"]["cuda"] = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    save_checkpoint(run / "ckpt.pt", {k: v for k, v in ckpt.items() if k != "format"})
    one = FakeCuda(monkeypatch, 1)
    resumed = fresh()
    fit(resumed, tiny_data, cfg, hooks=[Killer(None)], run_dir=run, resume=True)
    assert int(one.states[0][0]) == 0  # device 0's saved state was restored
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------- 4: DDP stop
def _diverging_rank(rank: int, port: int, cache: str, out: str) -> None:
    """``qatlab train`` under a pretend torchrun; rank 1's loss explodes from its second step."""
    pretend_torchrun(rank, port)
    torch.set_num_threads(1)
    import qatlab.train.loop as loop
    from qatlab.cli import main

    if rank == 1:
        original = loop.train_step

        def exploding(*args, **kwargs):
            result = original(*args, **kwargs)
            if args[5] >= 1:
                result.loss = result.loss * 1e6
            return result

        loop.train_step = exploding
    args = ["train", "--dataset", "mnist1d", "--num-samples", "600", "--model", "mlp5"]
    args += ["--epochs", "3", "--batch-size", "32", "--device", "cpu", "--quiet"]
    args += ["--out-dir", out, "--name", "ddp", "--set", f"data.cache_dir={cache}"]
    args += ["--set", "train.log_every=3"]
    err = io.StringIO()
    with redirect_stderr(err):
        code = main(args)
    Path(out, f"rank{rank}.txt").write_text(f"{code}\n{err.getvalue()}")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_ranks_stop_together_when_one_diverges(tmp_path, data_cache):
    """Rank 1's loss explodes, rank 0's does not: both stop at the same step (the first
    divergence check, inside epoch 1) with the same one-line error and exit code 3; neither
    waits for the other. Was: under torchrun only the epoch end was checked, with each rank's
    own first loss as the scale."""
    from qatlab import data

    data.load("mnist1d", num_samples=600, cache_dir=str(data_cache))
    ctx = torch.multiprocessing.start_processes(
        _diverging_rank,
        args=(free_port(), str(data_cache), str(tmp_path)),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("the ranks did not finish: one waits for the other")
    results = [(tmp_path / f"rank{r}.txt").read_text().split("\n", 1) for r in (0, 1)]
    codes = [int(code) for code, _ in results]
    errors = [[ln for ln in err.splitlines() if ln.strip()] for _, err in results]
    assert codes == [3, 3]
    assert errors[0] == errors[1] and len(errors[0]) == 1, errors
    assert "training diverged in epoch 1 (step 3)" in errors[0][0]
    assert not (tmp_path / "ddp" / "ckpt.pt").exists()


# ----------------------------------------------------------------------------- the rest
def test_logadam_foreach_matches_the_per_parameter_loop():
    """The ``_foreach`` LogAdam gives bit for bit what the per-parameter loop gave, with
    parameters skipping steps (their own step counts) and a plain-Adam group."""
    from qatlab.train.optim import LogAdam

    def reference(params, grads_per_step, lr=0.05, betas=(0.9, 0.999), eps=1e-8):
        state = {}
        for grads in grads_per_step:
            for i, (p, g, log) in enumerate(zip(params, grads, (1, 1, 1, 0), strict=True)):
                if g is None:
                    continue
                g = g * p if log else g
                s = state.setdefault(i, [0, torch.zeros_like(p), torch.zeros_like(p)])
                s[0] += 1
                t, m, v = s
                m.lerp_(g, 1 - betas[0])
                v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
                denom = (v / (1 - betas[1] ** t)).sqrt_().add_(eps)
                update = m / denom * (lr / (1 - betas[0] ** t))
                p.mul_(update.neg_().exp_()) if log else p.sub_(update)
        return params

    torch.manual_seed(0)
    shapes = [(), (3,), (4, 5), (2,)]
    start = [torch.rand(s) + 0.1 for s in shapes]
    grads = [
        [None if (i + j) % 5 == 0 else torch.randn(s) for j, s in enumerate(shapes)]
        for i in range(12)
    ]
    params = [nn.Parameter(t.clone()) for t in start]
    opt = LogAdam([{"params": params[:3]}, {"params": params[3:], "log": False}], lr=0.05)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g
        opt.step()
    expected = reference([t.clone() for t in start], grads)
    for p, e in zip(params, expected, strict=True):
        assert torch.equal(p.detach(), e)
    assert [opt.state[p]["step"] for p in params] == [9, 10, 10, 10]


def test_sync_batchnorm_is_pytorchs_on_cuda_and_qatlabs_on_the_cpu():
    from qatlab.train.distributed import SyncBatchNorm, sync_batchnorm

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.ReLU())

    cpu, cuda = sync_batchnorm(net()), net()
    bn = cuda[1]
    weight, mean = bn.weight, bn.running_mean
    sync_batchnorm(cuda, device="cuda")  # a CPU model, converted as if it lived on a GPU
    assert type(cpu[1]) is SyncBatchNorm and type(cuda[1]) is nn.SyncBatchNorm
    assert cuda[1].weight is weight and cuda[1].running_mean is mean  # in place
    x = torch.randn(8, 1, 10)
    assert torch.allclose(cuda(x), cpu(x))  # no process group: both are plain BatchNorm


@pytest.mark.parametrize(
    "args",
    [
        ["eval", "--checkpoint", "missing.pt", "--device", "cuda"],
        ["ptq", "--checkpoint", "missing.pt", "--device", "cuda"],
        ["compare", "demo", "--device", "cuda", "--dry-run"],
    ],
)
def test_device_flag_without_a_gpu_is_one_line(args, capsys):
    from qatlab.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "qatlab: error: train.device is cuda but no CUDA GPU is available; use cpu or auto"
    ]


def test_eval_and_ptq_run_on_the_device_asked_for(tiny_data_config, tmp_path, capsys):
    """``--device cpu`` works end to end and ``cell_config`` carries a compare device into
    every cell's run config without changing the cell."""
    from qatlab.cli import main
    from qatlab.compare.engine import cell_config
    from qatlab.compare.spec import load_grid

    args = ["train", "--dataset", "mnist1d", "--model", "mlp5", "--epochs", "1", "--quiet"]
    args += ["--num-samples", str(tiny_data_config["num_samples"]), "--device", "cpu"]
    args += ["--set", f"data.cache_dir={tiny_data_config['cache_dir']}"]
    args += ["--out-dir", str(tmp_path), "--name", "r"]
    assert main(args) == 0
    best = str(tmp_path / "r" / "best.pt")
    assert main(["eval", "--checkpoint", best, "--device", "cpu"]) == 0
    assert main(["ptq", "--checkpoint", best, "--bits", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "test acc" in out and "W4A4" in out
    cell = load_grid("demo", ["seeds=[0]"]).cells[0]
    assert cell_config(cell, tmp_path, "cpu")["train"]["device"] == "cpu"
    assert "device" not in cell.config.get("train", {})
