"""Task files: every shipped task validates; broken files fail with the field named."""

import pytest

from gold_ray.run.tasks import TaskFileError, load_task, resolve_data_path, shipped_tasks

SST2 = """
name: mine
type: classification
description: Is it good?
input_fields: [{name: text, display: Text}]
labels:
  - {name: good, description: it is good}
  - {name: bad, description: it is bad}
seed_demos:
  - {text: "lovely stuff", label: good}
"""


@pytest.mark.parametrize("name", sorted(shipped_tasks()))
def test_every_shipped_task_validates(name):
    task = load_task(name)
    assert task.name == name
    assert 3 <= len(task.seed_demos) <= 5
    assert task.eval is not None and task.eval.path
    if task.is_classification:
        assert all(d["label"] in task.label_names for d in task.seed_demos)


def test_expected_tasks_are_shipped():
    assert {"sst2", "ag_news", "rte", "qnli", "mrpc", "cola", "svamp"} <= set(shipped_tasks())


def test_user_task_file_loads(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(SST2)
    task = load_task(path)
    assert task.label_names == ["good", "bad"]
    assert task.target_key == "label"


def test_yes_no_and_number_labels_are_text_as_written(tmp_path):
    # YAML 1.1 (PyYAML's default) reads yes and no as booleans; a newcomer's labels must stay labels.
    path = tmp_path / "mine.yaml"
    path.write_text(SST2.replace("name: good", "name: yes").replace("name: bad", "name: no")
                    .replace("label: good}", "label: yes}\n  - {text: \"dull stuff\", label: no}"))
    task = load_task(path)
    assert task.label_names == ["yes", "no"] and [d["label"] for d in task.seed_demos] == ["yes", "no"]
    path.write_text(SST2.replace("name: good", "name: 5").replace("name: bad", "name: 1").replace("label: good}", "label: 5}"))
    task = load_task(path)
    assert task.label_names == ["5", "1"] and task.seed_demos[0]["label"] == "5"
    path.write_text(SST2.replace("description: Is it good?", "description: true"))
    with pytest.raises(TaskFileError, match="description"):  # true and false are still booleans
        load_task(path)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda s: s.replace("  - {name: bad, description: it is bad}\n", ""), "labels"),
        (lambda s: s.replace("name: bad", "name: good"), "labels"),
        (lambda s: s.replace('seed_demos:\n  - {text: "lovely stuff", label: good}\n', "seed_demos: []\n"),
         "seed_demos"),
        (lambda s: s.replace("label: good}", "label: great}"), r"seed_demos\[0\]\.label"),
        (lambda s: s.replace("type: classification", "type: regression"), "type"),
        (lambda s: s + "colour: blue\n", "colour"),
        (lambda s: s.replace("display: Text}", "display: Text, min_chars: 500, max_chars: 100}"),
         r"input_fields\.0: .*min_chars 500 is above max_chars 100"),
        (lambda s: s.replace("name: bad", "name: Good"), r"labels: label names that differ only in case"),
        (lambda s: s.replace("description: Is it good?", "description: '  '"), "description"),
    ],
)
def test_broken_task_names_the_field(tmp_path, edit, field):
    path = tmp_path / "broken.yaml"
    path.write_text(edit(SST2))
    with pytest.raises(TaskFileError, match=field):
        load_task(path)


def test_a_misspelt_key_gets_the_known_one_and_a_file_check_its_own_field(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(SST2.replace("{name: text, display: Text}", "{name: text, display: Text, max_char: 90}")
                    + "evaluation: {path: x.jsonl}\n")
    with pytest.raises(TaskFileError) as err:
        load_task(path)
    assert "evaluation: Extra inputs are not permitted (did you mean 'eval'?)" in str(err.value)
    assert "input_fields.0.max_char: Extra inputs are not permitted (did you mean 'max_chars'?)" in str(err.value)
    path.write_text(SST2.replace("label: good}", "label: great}"))
    with pytest.raises(TaskFileError) as err:
        load_task(path)
    assert str(err.value).endswith("\n  seed_demos[0].label: 'great' is not in the label set ['bad', 'good']")


def test_missing_task_lists_shipped_ones():
    with pytest.raises(TaskFileError, match="sst2"):
        load_task("no-such-task")


def test_relative_data_path_needs_a_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("GOLD_RAY_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="GOLD_RAY_DATA"):
        resolve_data_path("sst2/test.jsonl")
    assert resolve_data_path("sst2/test.jsonl", tmp_path) == tmp_path / "sst2/test.jsonl"


def test_shipped_tasks_name_their_public_dataset():
    named = {name: load_task(name).eval.hf for name in shipped_tasks()}
    assert named["svamp"] is None  # its question joins two columns: the local mirror only
    assert named["sst2"].source == "hf:nyu-mll/glue/sst2:validation"
    assert named["ag_news"].source == "hf:fancyzhx/ag_news:test"
    for name, hf in named.items():
        if hf is not None:
            assert sorted(hf.label_names) == sorted(load_task(name).label_names), name


@pytest.mark.parametrize(
    ("eval_yaml", "field"),
    [
        ("eval: {}\n", r"eval: .*name a `path`, an `hf` dataset"),
        ("eval: {hf: {path: glue, name: sst2}}\n", r"eval\.hf\.split"),
        ("eval: {hf: {path: '', split: test}}\n", r"eval\.hf\.path"),
        ("eval: {hf: {path: glue, split: test, fields: {sentence: text}}}\n", r"eval\.hf\.fields: \['sentence'\]"),
        ("eval: {hf: {path: glue, split: test, label_names: [good, meh]}}\n", r"eval\.hf\.label_names: \['meh'\]"),
        ("eval: {hf: {path: glue, split: test, label_names: []}}\n", r"eval\.hf\.label_names"),
        ("eval: {hf: {path: glue, split: test, revision: main}}\n", r"eval\.hf\.revision"),
    ],
)
def test_bad_eval_dataset_spec_names_the_field(tmp_path, eval_yaml, field):
    path = tmp_path / "broken.yaml"
    path.write_text(SST2 + eval_yaml)
    with pytest.raises(TaskFileError, match=field):
        load_task(path)


def test_relative_eval_file_beside_the_task_file_wins_over_the_mirror(monkeypatch, tmp_path):
    from gold_ray.config import TaskConfig
    from gold_ray.student.evaluation import load_task_eval

    project, mirror = tmp_path / "project", tmp_path / "mirror"
    project.mkdir()
    (mirror / "sub").mkdir(parents=True)
    (project / "mine.yaml").write_text(SST2 + "eval: {path: my_eval.jsonl}\n")
    (project / "my_eval.jsonl").write_text('{"text": "lovely", "label": "good"}\n{"text": "awful", "label": "bad"}\n')
    (mirror / "my_eval.jsonl").write_text('{"text": "mirror", "label": "good"}\n')
    monkeypatch.setenv("GOLD_RAY_DATA", str(mirror))
    monkeypatch.chdir(tmp_path)  # the task is named from elsewhere, as `--set task.name=project/mine.yaml`

    task = load_task("project/mine.yaml")
    assert task.eval.path == str((project / "my_eval.jsonl").absolute())
    evaluation = load_task_eval(task, TaskConfig(name="project/mine.yaml"))
    assert [r["text"] for r in evaluation.records] == ["lovely", "awful"] and evaluation.source.startswith("file:")

    # Not beside the file: the path still names the mirror's file, as a shipped task's does.
    (project / "mine.yaml").write_text(SST2 + "eval: {path: sub/other.jsonl}\n")
    assert load_task("project/mine.yaml").eval.path == "sub/other.jsonl"
    assert load_task("sst2").eval.path == "sst2/test.jsonl"


def test_relative_seed_file_beside_the_task_file_is_found_from_anywhere(monkeypatch, tmp_path):
    # S3's validation set and LLKD's pool default to seed_path: a newcomer keeps it beside the task.
    from gold_ray.config import load_config
    from gold_ray.strategies.base import resolve_strategy_input

    project = tmp_path / "project"
    project.mkdir()
    (project / "mine.yaml").write_text(SST2 + "seed_path: seed.jsonl\n")
    (project / "seed.jsonl").write_text('{"text": "lovely", "label": "good"}\n')
    monkeypatch.delenv("GOLD_RAY_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    task = load_task("project/mine.yaml")
    assert task.seed_path == str((project / "seed.jsonl").absolute())
    cfg = load_config(None, ["task.name=project/mine.yaml", "strategy.name=s3"])
    assert resolve_strategy_input(cfg, task, "val_path", None, "S3's validation set") == project / "seed.jsonl"


def test_a_text_to_text_target_must_not_be_an_input_field(tmp_path):
    path = tmp_path / "qa.yaml"
    path.write_text("name: qa\ntype: text_to_text\ndescription: Answer it.\n"
                    "input_fields: [{name: question, display: Question}]\ntarget_field: question\n"
                    "seed_demos: [{question: what is two plus two}]\n")
    with pytest.raises(TaskFileError, match="target_field: 'question' is an input field too"):
        load_task(path)
