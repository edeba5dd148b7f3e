"""The README runs as written: its Python blocks (in order, like notebook cells, with
``EPOCHS = 3``) and every command-line example (the MNIST-1D ones for real on a small sample,
the CIFAR-10 and torchrun ones parsed and validated, comparisons as ``--dry-run``)."""

from __future__ import annotations

import re
import shlex
import shutil
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
TINY = ["--epochs", "1", "--num-samples", "300", "--batch-size", "64"]


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README, re.S | re.M)


def commands() -> list[str]:
    """Every ``qatlab``/``torchrun`` command of the README's bash blocks, one per line."""
    out = []
    for block in re.findall(r"^```bash\n(.*?)^```", README, re.S | re.M):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith(("qatlab ", "torchrun ")):
                out.append(line)
    return out


def test_python_blocks_run_and_the_own_loop_beats_chance(tmp_path, monkeypatch):
    """Each block trains something; every model it leaves in ``qmodel`` is far above chance
    (10 classes: 0.1) on the held-out digits, the first (from scratch, own loop) included,
    and no step size needed the guard."""
    pytest.importorskip("sklearn")
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks()
    assert len(blocks) >= 6  # scratch, checkpoint, loss term, SAQ, TALR, regularizer
    namespace: dict = {"__name__": "readme"}
    accuracies = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, block in enumerate(blocks, 1):
            source, n = re.subn(r"^EPOCHS = \d+$", "EPOCHS = 3", block, flags=re.M)
            assert n == (1 if i == 1 else 0)
            exec(compile(source, f"README.md python block {i}", "exec"), namespace)
            model = namespace.get("ptq_model") if "ptq_model" in source else namespace["qmodel"]
            accuracies.append(namespace["accuracy"](model))
            if "to_onnx" in source:  # the export block: ONNX Runtime predicts as qatlab does
                with torch.no_grad():
                    ours = model.eval()(namespace["test_x"]).argmax(1).numpy()
                assert (namespace["logits"].argmax(1) == ours).mean() >= 0.995
                assert (tmp_path / "model.int.json").is_file()
    assert namespace["acc"] == accuracies[0]
    assert accuracies[0] > 0.8, accuracies  # from scratch with qatlab.optimizer
    assert min(accuracies) > 0.6, accuracies
    guard = [w for w in caught if "step size of layer" in str(w.message)]
    assert not guard, guard[0].message


def test_cli_examples_run_as_written(tmp_path, monkeypatch, data_cache, capsys):
    from qatlab.cli import build_parser, config_from_args, main

    monkeypatch.chdir(tmp_path)  # as from the repository's root, without touching its runs/
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    lines = commands()
    assert len(lines) >= 15
    grid = re.search(r"^```yaml\n(name: lsq-vs-dampening.*?)^```", README, re.S | re.M)
    (tmp_path / "grid.yaml").write_text(grid.group(1))
    cache = ["--set", f"data.cache_dir={data_cache}"]
    trained: dict[str, tuple] = {}
    ran = dry = 0
    for line in lines:
        argv = shlex.split(line)
        if argv[0] == "torchrun":
            argv = argv[argv.index("qatlab.cli") + 1 :]
        else:
            argv = argv[1:]
        command = argv[0]
        if command == "train":
            args = build_parser().parse_args(argv)
            if args.resume:  # continues a run trained above: as written
                assert args.name in trained, line
                code = main([*argv, "--quiet"])
                ran += 1
            elif "cifar10" in line or args.config:
                cfg = config_from_args(args)  # validated, as a run would be
                if cfg.init_from:
                    source = Path(cfg.init_from).parent.name
                    assert trained.get(source) == (cfg.model.name, cfg.data.name), line
                trained[cfg.name] = (cfg.model.name, cfg.data.name)
                dry += 1
                continue
            else:
                code = main([*argv, *TINY, "--quiet", *cache])
                cfg = config_from_args(args)
                trained[cfg.name] = (cfg.model.name, cfg.data.name)
                ran += 1
        elif command in ("eval", "ptq"):
            code = main(argv)
            ran += 1
        elif command == "compare":
            code = main([*argv, "--dry-run"])
            dry += 1
        else:  # report: needs a finished comparison; the arguments must parse
            build_parser().parse_args(argv)
            dry += 1
            continue
        err = capsys.readouterr().err
        assert code == 0, f"{line}\n{err}"
    assert ran >= 9 and dry >= 5
    assert (tmp_path / "runs" / "w2a2-sgdt" / "summary.json").is_file()
