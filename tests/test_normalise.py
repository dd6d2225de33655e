"""Row normalisation on hand-made batches: every drop reason, label mapping, header and BOM handling."""

from __future__ import annotations

import pyarrow as pa

from pipeline.data.normalise import SCHEMA, Normaliser
from pipeline.tasks import Columns, TaskSpec


def _spec(kind="classification", **kw):
    return TaskSpec("t", kind, "test", num_labels=kw.pop("num_labels", 2 if kind == "classification" else 1),
                    metrics=kw.pop("metrics", ("accuracy",) if kind == "classification" else ("pearson",)), **kw)


def _tsv(lines, spec, columns, names=("sentence", "label"), header="sentence\tlabel", **kw):
    norm = Normaliser(spec, columns, "lines", "tsv", split_of_path={"f.tsv": "train"},
                      names_of_path={"f.tsv": names}, header_of_path={"f.tsv": header} if header else {}, **kw)
    return norm(pa.table({"text": lines, "path": ["f.tsv"] * len(lines)})).to_pylist()


def test_tsv_header_bom_and_every_classification_drop_reason():
    rows = _tsv(["\ufeffsentence\tlabel", "good film\t1", "bad film\t0", "no tab here", "\t1", "x\t", "y\tfive",
                 "z\t7", "w\t1.5", 'a "quoted\tword\t1'], _spec(), Columns("sentence", label="label"))
    assert [r["drop_reason"] for r in rows] == ["", "", "unparsable", "empty_text", "missing_label", "bad_label",
                                               "label_out_of_range", "bad_label", "unparsable"]
    assert [r["label"] for r in rows[:2]] == [1.0, 0.0]
    assert all(r["task"] == "t" and r["split"] == "train" for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)  # content-hash ids are distinct for distinct rows


def test_label_names_regression_range_and_pairs():
    spec = _spec(label_names=("entailment", "not_entailment"))
    rows = _tsv(["a\tb\tnot_entailment", "a\tb\tentailment", "a\t\tentailment", "a\tb\tmaybe"], spec,
                Columns("s1", "s2", label="y"), names=("s1", "s2", "y"), header=None)
    assert [(r["label"], r["drop_reason"]) for r in rows] == [
        (1.0, ""), (0.0, ""), (None, "empty_text_pair"), (None, "bad_label")]
    reg = _spec("regression", label_range=(0.0, 5.0))
    rows = _tsv(["a\t4.2", "b\t5.5", "c\tnan", "d\t0"], reg, Columns("sentence", label="label"), header=None)
    assert [(r["label"], r["drop_reason"]) for r in rows] == [
        (4.2, ""), (None, "label_out_of_range"), (None, "bad_label"), (0.0, "")]


def test_unlabelled_splits_keep_rows_without_labels():
    rows = _tsv(["0\thello"], _spec(), Columns("sentence", label="label", id="index"),
                names=("index", "sentence"), header=None, unlabelled=frozenset({"train"}))
    assert rows[0]["drop_reason"] == "" and rows[0]["label"] is None and rows[0]["id"] == "0"


def test_jsonl_summarization_and_where_filter_and_carve():
    spec = _spec("summarization", num_labels=0, metrics=("rouge1",))
    lines = ['{"id": "1", "doc": "long text", "sum": "short"}', '{"id": "2", "doc": "text", "sum": ""}',
             "{not json", "[1, 2]", '{"id": "3", "doc": "t", "sum": "s", "lang": "fr"}']
    norm = Normaliser(spec, Columns("doc", target="sum", id="id"), "lines", "jsonl", split_of_path={"a.jsonl": "all"},
                      carve_from="all", carve={"train": 0.5, "test": 0.5}, where={})
    rows = norm(pa.table({"text": lines, "path": ["a.jsonl"] * 5})).to_pylist()
    assert [r["drop_reason"] for r in rows] == ["", "empty_target", "unparsable", "unparsable", ""]
    assert rows[0]["target"] == "short" and {r["split"] for r in rows} <= {"train", "test"}
    norm.where = {"lang": "fr"}
    kept = norm(pa.table({"text": lines, "path": ["a.jsonl"] * 5})).to_pylist()
    # Rows of other subsets are skipped, not counted as bad; unparsable lines cannot be attributed to a
    # subset, so they are counted for every task that reads the file.
    assert [r["drop_reason"] or r["id"] for r in kept] == ["unparsable", "unparsable", "3"]


def test_table_and_text_folder_layouts():
    spec = _spec(num_labels=3, label_names=("business", "sports", "tech"))
    norm = Normaliser(spec, Columns("text", label="label", id="id"), "text_folders", split_of_path={"d/sports/1.txt": "train"})
    rows = norm(pa.table({"bytes": [b"Goal!"], "path": ["d/sports/1.txt"]})).to_pylist()
    assert rows[0]["label"] == 1.0 and rows[0]["id"] == "sports/1.txt" and rows[0]["text"] == "Goal!"
    norm = Normaliser(_spec(), Columns("review", label="stars"), "table")
    out = norm(pa.table({"review": ["ok", None], "stars": [1, 0], "split": ["validation", "validation"]}))
    assert out.schema == SCHEMA
    assert [(r["split"], r["drop_reason"]) for r in out.to_pylist()] == [("validation", ""), ("validation", "empty_text")]
