"""The project's own promises: README and docs match the code, one dependency list, CI runs the README's tests."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from pipeline.config import reference_markdown
from pipeline.tasks import BUILTIN

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = {p.name: p.read_text() for p in (ROOT / "docs").glob("*.md")}


def test_config_reference_is_current():
    block = DOCS["configuration.md"].split("<!-- config-reference:start")[1].split("<!-- config-reference:end -->")[0]
    assert block.split("\n", 1)[1].strip() == reference_markdown().strip(), \
        "regenerate with: python -m pipeline.config --reference"


def test_guide_catalogue_lists_every_builtin_task():
    for spec in BUILTIN:
        assert f"| `{spec.name}` |" in DOCS["guide.md"], spec.name


def test_readme_and_docs_link_only_to_files_that_exist():
    for name, text in [("README.md", README)] + [(f"docs/{n}", t) for n, t in DOCS.items()]:
        base = ROOT if name == "README.md" else ROOT / "docs"
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not target.startswith(("http://", "https://")):
                assert (base / target).exists(), (name, target)


def test_readme_two_commands_and_ci_runs_the_test_command():
    assert "make run" in README and "make test" in README
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run: setup", makefile, re.M) and re.search(r"^test: setup", makefile, re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make setup" in ci


def test_environment_yml_mirrors_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert set(pip) == wanted
    assert "torch==2.13.0" in wanted


def test_every_job_docstring_starts_with_its_run_command():
    for job in sorted((ROOT / "jobs").glob("*.py")):
        first = job.read_text().split('"""')[1].splitlines()[0]
        assert first.startswith("ray job submit ") and f"python jobs/{job.name}" in first, job.name


def test_model_code_knows_nothing_about_distribution():
    for path in (ROOT / "pipeline" / "model").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(ray|deepspeed|torch\.distributed)\b", text, re.M), path
