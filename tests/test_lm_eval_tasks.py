"""`vlmpress eval --tasks` against the real lm-eval package, with a task defined over local files."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval", reason="needs the llm extra (pip install 'vlmpress[llm]')")

from vlmpress.cli import main  # noqa: E402
from vlmpress.reference.lm import save_tiny_causal_lm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [
    {"question": "The sky is", "choices": ["blue", "green"], "label": 0},
    {"question": "Fire is", "choices": ["cold", "hot"], "label": 1},
    {"question": "Water is", "choices": ["wet", "dry"], "label": 0},
    {"question": "Snow is", "choices": ["black", "white"], "label": 1},
]


def _local_task(folder):
    folder.mkdir()
    data = folder / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "toy.yaml").write_text(
        "task: vlmpress_local_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        "doc_to_target: label\n"
        "doc_to_choice: choices\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def test_eval_tasks_runs_real_lm_eval_on_local_task(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # nothing from the hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = save_tiny_causal_lm(tmp_path / "llama", "llama", seed=0, layers=2)
    tasks = _local_task(tmp_path / "tasks")
    out = tmp_path / "res"
    code = main(["eval", "--model", f"hf:{model}", "--tasks", "vlmpress_local_mc", "--task-include", str(tasks),
                 "--out", str(out), "--device", "cpu", "--label", "tiny"])
    assert code == 0, capsys.readouterr().err
    rec = json.loads((out / "results.jsonl").read_text().splitlines()[0])
    acc = rec["metrics"]["tasks"]["vlmpress_local_mc"]["acc"]
    assert acc in {0.0, 0.25, 0.5, 0.75, 1.0}  # a real mean over the 4 local examples
    assert rec["kind"] == "lm_eval" and rec["label"] == "tiny"
    # an unknown task is a one-line error, not a traceback
    assert main(["eval", "--model", f"hf:{model}", "--tasks", "no_such_task_xyz", "--task-include", str(tasks),
                 "--out", str(out), "--device", "cpu"]) == 2
    assert "no_such_task_xyz" in capsys.readouterr().err
