"""Publishing a comparison as a results page (``qatlab report RUN --page docs/results/NAME.md``)
and rebuilding it from the published folder alone; ``--dry-run`` marking cells that wait for a
selection; report tables naming rows by the stages' arm labels."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import InlineBackend

from qatlab.cli import main
from qatlab.compare.engine import run_grid
from qatlab.compare.report import INPUTS, PUBLISHED, build_report, load_results, publish
from qatlab.compare.spec import expand
from qatlab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
NOTES = "## Set-up\n\nWritten by hand: *why* this grid.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n"


def _doc(data: dict) -> dict:
    """A selecting stage (one seed, two LRs), its user with an arm label, and a labelled
    control: 6 one-epoch cells of a 16-wide mlp5 at W4A4."""
    return {
        "name": "pub",
        "description": "A tiny grid:\n  LSQ at the LR chosen on validation vs the default LR.",
        "base": {
            "data": data,
            "model": {"name": "mlp5", "width": 16},
            "quant": {"weight_bits": 4, "act_bits": 4},
            "train": {"epochs": 1, "batch_size": 64},
        },
        "seeds": [0, 1],
        "stages": [
            {
                "name": "tune",
                "seeds": [10],
                "axes": {"method.name": ["qat"], "train.lr": [1e-3, 3e-3]},
                "select": {"axis": "train.lr", "metric": "val_acc"},
            },
            {
                "name": "final",
                "label": "LSQ tuned",
                "axes": {"method.name": ["qat"]},
                "use": {"train.lr": "tune"},
            },
            {"name": "base", "label": "LSQ default", "axes": {"method.name": ["qat"]}},
        ],
        "contrasts": [
            {"metric": "test_acc", "control": {"stage": "base"}, "arms": {"stage": ["final"]}}
        ],
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_data_config) -> tuple[Path, Path]:
    """The grid's YAML file and its finished comparison folder (run once for the module)."""
    tmp = tmp_path_factory.mktemp("publish")
    path = tmp / "pub.yaml"
    path.write_text(yaml.safe_dump(_doc(tiny_data_config), sort_keys=False))
    out = tmp / "run"
    counts = run_grid(
        expand(_doc(tiny_data_config), default_name="pub"),
        out,
        source=str(path),
        workers=1,
        progress=False,
        make_backend=InlineBackend,
    )
    assert counts == {"done": 6, "failed": 0, "ran": 6}
    return path, out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_publish_then_rebuild_from_a_copy_of_the_folder_alone(finished, tmp_path):
    grid_file, run = finished
    page = tmp_path / "docs" / "results" / "pub.md"
    folder = tmp_path / "docs" / "results" / "pub"
    folder.mkdir(parents=True)
    (folder / "notes.md").write_text(NOTES)
    assert main(["report", str(run), "--page", str(page), "--title", "A tiny study"]) == 0
    text = page.read_text()

    # the header, the notes verbatim, then the generated sections with paths into pub/
    assert text.startswith("# A tiny study\n\nA tiny grid: LSQ at the LR chosen on validation")
    assert f"qatlab compare {page.with_suffix('')}/grid.yaml --out runs/compare/pub\n" in text
    assert f"qatlab report runs/compare/pub --page {page}\n" in text
    facts = "\n6 cells (6 finished, 0 failed, 0 not run); seeds: stage tune 10; stage final 0, 1; "
    assert facts + "stage base 0, 1; training time summed over the finished cells " in text
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    first = time.strftime("%Y-%m-%d %H:%M", time.gmtime(min(e["time"] for e in events)))
    assert f"the finished cells trained from {first} to " in text
    assert "\n\n" + NOTES.strip("\n") + "\n\n## " in text
    assert text.index(NOTES.strip("\n")) < text.index("## Results")
    assert "![validation accuracy over training](pub/curves.png)" in text
    assert "[results.csv](pub/results.csv)" in text and "](results.csv)" not in text
    # the main tables name rows by the arm label (stage label), not by the stage's name
    assert "| arm | method | lr | test acc % |" in text
    assert "\n| LSQ tuned | qat | – | " in text and "\n| LSQ default | qat | – | " in text
    assert "\n| final | qat |" not in text

    # the folder: the stored results and the report's files, no cells/, no checkpoints
    names = {p.name for p in folder.iterdir()}
    assert names == {
        "comparison.json",
        "cells.json",
        "selections.json",
        "events.jsonl",
        "failures.jsonl",
        "logs.jsonl",
        "published.json",
        "notes.md",
        "grid.yaml",
        "results.jsonl",
        "results.csv",
        "contrasts.csv",
        "contrasts.json",
        "curves.png",
    }
    assert (folder / "comparison.json").read_bytes() == (run / "comparison.json").read_bytes()
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    stored = [json.loads(p.read_text()) for p in sorted(run.glob("cells/*/result.json"))]
    assert sorted(rows, key=lambda r: r["cell"]) == sorted(stored, key=lambda r: r["cell"])
    # logs: only what the report reads (the curves plot: epoch and val_acc of epoch records)
    logs = [json.loads(line) for line in (folder / "logs.jsonl").read_text().splitlines()]
    assert {cell for cell, _ in logs} == {r["cell"] for r in rows}
    assert all(set(r) == {"epoch", "val_acc"} for _, r in logs)
    full = (run / "cells" / "final-qat-s0" / "metrics.jsonl").read_text().splitlines()
    kept = [r for c, r in logs if c == "final-qat-s0"]
    assert kept == [
        {"epoch": r["epoch"], "val_acc": r["val_acc"]}
        for r in map(json.loads, full)
        if "val_acc" in r
    ]
    assert sum(map(len, kept)) < sum(len(json.loads(line)) for line in full) / 2
    # the grid was a file: it is kept beside the page, and it expands to the same cells
    assert (
        expand(yaml.safe_load((folder / "grid.yaml").read_text())).cells
        == expand(yaml.safe_load(grid_file.read_text()), default_name="pub").cells
    )

    # a copy elsewhere, with no run folder: the same page and the same files, byte for byte
    before = _files(folder)
    copy = tmp_path / "elsewhere" / "results" / "pub"
    copy.mkdir(parents=True)
    for name in INPUTS:
        if (folder / name).is_file():
            shutil.copy2(folder / name, copy / name)
    assert len(list(copy.iterdir())) < len(before)
    assert main(["report", str(copy)]) == 0
    assert (copy.parent / "pub.md").read_bytes() == page.read_bytes()
    assert _files(copy) == before  # csv, json and (same matplotlib) the PNG
    # and in another process with other string hashes (set orders): the same again
    again = tmp_path / "again" / "pub"
    shutil.copytree(copy, again)
    (again / "results.csv").unlink()
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "qatlab.cli", "report", str(again)]
    assert subprocess.run(cmd, env=env, capture_output=True, check=False).returncode == 0
    assert (again.parent / "pub.md").read_bytes() == page.read_bytes()
    assert _files(again) == before
    # in place, again: nothing changes
    assert main(["report", str(folder)]) == 0
    assert _files(folder) == before and page.read_text() == text

    # publishing again keeps notes.md; its edits show up in the page
    (folder / "notes.md").write_text(NOTES + "\nVerdict: none.\n")
    publish(run, page, title="A tiny study")
    assert "Verdict: none.\n\n## " in page.read_text()


def test_published_folder_reads_no_run_folder(finished, tmp_path):
    _, run = finished
    page = tmp_path / "pub.md"
    publish(run, page)
    res = load_results(tmp_path / "pub")
    assert res.published is not None and res.source is None
    assert [r["cell"] for r in res.rows] == [r["cell"] for r in load_results(run).rows]
    assert page.read_text().startswith("# pub\n")  # the default title: the grid's name
    with pytest.raises(ConfigError, match="is a published folder"):
        publish(tmp_path / "pub", tmp_path / "other.md")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "data.csv").write_text("x\n")
    with pytest.raises(ConfigError, match="is not a published comparison folder"):
        publish(run, tmp_path / "taken.md")
    assert not (tmp_path / "taken.md").exists()
    with pytest.raises(ConfigError, match="must be a Markdown file"):
        publish(run, tmp_path / "page.html")


def test_report_without_page_is_unchanged(finished, tmp_path):
    _, run = finished
    out = tmp_path / "run"
    shutil.copytree(run, out)
    table = build_report(out)
    report = (out / "report.md").read_text()
    assert report.startswith("# Comparison: pub\n") and "![validation accuracy" in report
    assert "](curves.png)" in report and "| LSQ tuned | qat | " in table
    assert not (out / PUBLISHED).exists()


def test_dry_run_marks_cells_that_wait_for_a_selection(finished, tmp_path, capsys):
    grid_file, run = finished
    out = tmp_path / "new"
    assert main(["compare", str(grid_file), "--out", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "new     tune-qat-0.001-s10",
        "new     tune-qat-0.003-s10",
        "waits   final-qat-s0  (for selection of stage tune)",
        "waits   final-qat-s1  (for selection of stage tune)",
        "new     base-qat-s0",
        "new     base-qat-s1",
        f"6 cells; folder {out}",
    ]
    assert not out.exists()
    # one tune cell finished, the other not: still waiting; both settled: no longer
    shutil.copytree(run, out)
    shutil.rmtree(out / "cells" / "final-qat-s1")
    (out / "cells" / "tune-qat-0.003-s10" / "result.json").unlink()
    assert main(["compare", str(grid_file), "--out", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:4] == [
        "partial tune-qat-0.003-s10",
        "waits   final-qat-s0  (for selection of stage tune)",
        "waits   final-qat-s1  (for selection of stage tune)",
    ]
    assert main(["compare", str(grid_file), "--out", str(run), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2:4] == ["done    final-qat-s0", "done    final-qat-s1"]


PUBLISHED_FOLDERS = sorted(p.parent for p in (ROOT / "docs" / "results").glob(f"*/{PUBLISHED}"))


@pytest.mark.parametrize("folder", PUBLISHED_FOLDERS, ids=[p.name for p in PUBLISHED_FOLDERS])
def test_every_committed_published_page_rebuilds_byte_for_byte(folder, tmp_path, monkeypatch):
    """Each docs/results/NAME/ with a publish marker: a copy of its stored results alone
    rebuilds the committed page and its CSV/JSON files (PNGs depend on the matplotlib
    version: compared when publishing, not here; not even drawn, to keep this cheap)."""
    import qatlab.train.plots

    monkeypatch.setattr(qatlab.train.plots, "_save", lambda fig, path: None)
    copy = tmp_path / folder.name
    copy.mkdir()
    for name in INPUTS:
        if (folder / name).is_file():
            shutil.copy2(folder / name, copy / name)
    build_report(copy)
    page = json.loads((folder / PUBLISHED).read_text())["page"]
    assert (copy / page).read_text() == (folder / page).read_text(), "the page differs"
    for path in sorted(folder.iterdir()):
        if path.suffix in (".csv", ".json", ".jsonl"):
            assert (copy / path.name).read_bytes() == path.read_bytes(), path.name
