"""Table 2 builder (pure), CSV/Markdown rendering, plot, and the eval -> report chain end to end."""

from __future__ import annotations

import csv
import io
import json

import pytest
from PIL import Image

import toy_adapter  # noqa: F401  (registers the "toy" adapter family used for a fast compressed model)
from vlmpress.cli import main
from vlmpress.evaluation.plots import plot_accuracy_vs_reduction
from vlmpress.evaluation.results import EvalRecord, ResultsError, read_records, write_record
from vlmpress.evaluation.table import build_table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rec(model, dataset, top1, top5, method="base", reduction=0.0, label="", **kw) -> EvalRecord:
    base = kw.pop("base_model", "open_clip:ViT-B-16/openai")
    return EvalRecord.from_dict(dict(
        model=model, dataset=dataset, split="official-test", metrics={"top1": top1, "top5": top5,
        "mean_per_class_recall": top1}, n_images=1000, n_classes=101, top1_stderr=0.01, seconds=1.0,
        method=method, reduction=reduction, label=label, base_model=base, **kw,
    ))


def paper_records() -> list[EvalRecord]:
    """A shuffled mix of Base / SVD / SVD-ALS / PGSVD at two levels on two datasets."""
    out = []
    for ds, (b1, b5) in {"food101": (0.886, 0.986), "caltech101": (0.864, 0.990)}.items():
        out.append(rec("open_clip:ViT-B-16/openai", ds, b1, b5))
        for level, red in ((40, 0.402), (20, 0.199)):
            for method, acc in (("pgsvd", 0.8), ("svd", 0.01), ("svd_als", 0.5)):
                scale = 1.0 if level == 20 else 0.9
                out.append(rec(f"ckpt/{method}-{level}", ds, acc * scale, min(1.0, 2 * acc * scale), method, red))
    return out[::-1]


def test_table_rows_follow_the_paper_layout():
    table = build_table(paper_records())
    assert table.datasets == ["caltech101", "food101"]  # registry order, not record order
    order = [(r.level, r.display_label) for r in table.rows]
    assert order == [("", "Base"), ("20%", "SVD"), ("20%", "SVD-ALS"), ("20%", "PGSVD"),
                     ("40%", "SVD"), ("40%", "SVD-ALS"), ("40%", "PGSVD")]
    md = table.to_markdown()
    lines = md.splitlines()
    assert "| Compression | Method | Caltech101 | Food101 | Average |" in lines
    assert "|  | Base | 86.40/99.00 | 88.60/98.60 | 87.50/98.80 |" in lines
    assert "| 20% | SVD | 1.00/2.00 | 1.00/2.00 | 1.00/2.00 |" in lines
    assert "|  | SVD-ALS | 50.00/100.00 | 50.00/100.00 | 50.00/100.00 |" in lines  # level shown once per group
    assert "| 40% | SVD | 0.90/1.80 | 0.90/1.80 | 0.90/1.80 |" in lines
    assert any("Caltech101: split official-test, 1000 images" in l for l in lines)
    assert table.rows[3].reduction == pytest.approx(0.199)


def test_missing_cells_duplicates_labels_and_template_ablation():
    records = paper_records()
    records.append(rec("ckpt/pgsvd-auto", "caltech101", 0.7, 0.9, "pgsvd", 0.2, label="PGSVD auto"))
    records.append(rec("open_clip:ViT-B-16/openai", "caltech101", 0.5, 0.9))  # re-run: latest wins
    records.append(rec("open_clip:ViT-B-16/openai", "caltech101", 0.6, 0.8, templates="single"))
    table = build_table(records)
    labels = [r.display_label for r in table.rows]
    assert labels[:2] == ["Base", "Base (single template)"] and "PGSVD auto" in labels
    base = table.rows[0]
    assert base.cells["caltech101"] == (0.5, 0.9)
    auto = next(r for r in table.rows if r.display_label == "PGSVD auto")
    assert auto.average(table.datasets) is None
    md = table.to_markdown()
    assert "| PGSVD auto | 70.00/90.00 | — | — |" in md
    assert "latest record is used" in md and "Average left empty" in md
    only_food = build_table(records, datasets=["food101"])
    assert only_food.datasets == ["food101"] and "PGSVD auto" not in only_food.to_markdown()


def test_csv_is_machine_readable():
    table = build_table(paper_records())
    rows = list(csv.DictReader(io.StringIO(table.to_csv())))
    assert len(rows) == 7
    base = rows[0]
    assert base["compression"] == "base" and base["method"] == "base" and base["label"] == "Base"
    assert float(base["caltech101_top1"]) == pytest.approx(86.4) and float(base["avg_top5"]) == pytest.approx(98.8)
    assert float(base["caltech101_top1_stderr"]) == pytest.approx(1.0) and base["food101_n_images"] == "1000"
    pg = rows[3]
    assert (pg["compression"], pg["method"], float(pg["reduction"])) == ("20%", "pgsvd", pytest.approx(0.199))


def test_several_base_models_get_a_model_column():
    records = paper_records() + [rec("open_clip:ViT-B-32/openai", "caltech101", 0.8, 0.95,
                                     base_model="open_clip:ViT-B-32/openai")]
    md = build_table(records).to_markdown()
    assert "| Model | Compression | Method |" in md and "open_clip:ViT-B-32/openai" in md


def test_plot_writes_a_png(tmp_path):
    path = plot_accuracy_vs_reduction(paper_records(), tmp_path / "plots" / "acc.png", metric="top5")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert not list((tmp_path / "plots").glob(".*tmp*"))


def test_read_records_skips_a_truncated_line(tmp_path, caplog):
    records = paper_records()[:3]
    for r in records:
        write_record(r, tmp_path)
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"model": "half-writ')  # a crash mid-append
    back = read_records(tmp_path / "results.jsonl")
    assert [r.to_dict() for r in back] == [r.to_dict() for r in records]
    assert "skipping unreadable record" in caplog.text
    assert len(read_records(tmp_path)) == 3  # a directory means its results.jsonl
    with pytest.raises(ResultsError, match="not found"):
        read_records(tmp_path / "nope.jsonl")


def test_report_cli_errors(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    assert main(["report", str(tmp_path / "empty.jsonl")]) == 2
    assert "no readable result records" in capsys.readouterr().err


def test_eval_then_report_end_to_end_with_a_compressed_checkpoint(tmp_path, capsys):
    images = tmp_path / "images"
    for c, cls in enumerate(("cat", "dog", "fox")):
        (images / cls).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (10, 8), (60 * c, 20 * i, 90)).save(images / cls / f"{i}.png")
    ckpt = tmp_path / "toy-svd"
    assert main(["compress", "--model", "toy:1", "--method", "svd", "--ratio", "0.4", "--calib-images", str(images),
                 "--out", str(ckpt), "-q"]) == 0
    out = tmp_path / "results"
    common = ["--datasets", f"imagefolder:{images}", "--num-workers", "0", "--out", str(out), "--no-progress", "-q"]
    assert main(["eval", "--model", "toy:1", *common]) == 0
    assert main(["eval", "--model", str(ckpt), "--label", "SVD uniform", *common]) == 0
    records = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    base, comp = records
    config = json.loads((ckpt / "vlmpress_config.json").read_text())
    assert base["method"] == "base" and base["compression"] is None and base["base_model"] == "toy:1"
    assert comp["method"] == "svd" and comp["compression"] == config["compression"]
    assert comp["reduction"] == pytest.approx(config["compression"]["targeted_reduction"]) and comp["reduction"] > 0.3
    assert comp["base_model"] == "toy:1" and comp["label"] == "SVD uniform"
    assert comp["split"] == base["split"] == "hash(seed=0,test=0.3)-test"
    capsys.readouterr()

    assert main(["report", str(out / "results.jsonl"), "--plot"]) == 0
    printed = capsys.readouterr().out
    md = (out / "table.md").read_text()
    assert md in printed
    level = f"{round(100 * comp['reduction'])}%"
    assert "| Compression | Method | images | Average |" in md
    assert "|  | Base |" in md and f"| {level} | SVD uniform |" in md
    rows = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert [r["label"] for r in rows] == ["Base", "SVD uniform"]
    assert (out / "accuracy_vs_reduction_top1.png").read_bytes().startswith(PNG_MAGIC)
