"""The README and docs say what the program does: commands that run, links that resolve, a reference that matches --help."""

import re
import shlex
from pathlib import Path

import pytest
from conftest import write_image_tree

from diffinv.cli import main, reference

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# For a command of the README run in a test: the same flags, then what makes it tiny (argparse keeps the last value).
TINY = {"demo": ["--fast", "--out", "runs/demo"],
        "experiment": ["--fast", "--val-per-class", "2", "--processes", "1", "--train-arch", "small-cnn", "--train-resolution", "8",
                       "--quiet", "--no-report"],
        "pretrain-base": ["--steps", "2", "--batch-size", "4", "--channels", "8,16", "--quiet"],
        "invert": ["--steps", "2", "--quiet"], "generate": ["--steps", "2", "--per-image", "1", "--quiet"],
        "train": ["--steps", "2", "--resolution", "16", "--quiet"]}


def readme_commands() -> list[list[str]]:
    """Every ``diffinv ...`` command of the README's bash blocks (``&&`` chains split, continuations joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    steps = [shlex.split(part, comments=True) for line in text.splitlines() for part in line.split("&&")]
    return [["diffinv", *argv[1:]] for argv in steps if argv and argv[0] in ("diffinv", ".venv/bin/diffinv")]


def test_the_readme_is_short_and_tells_no_history():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for page in PAGES:
        found = re.findall(r"\bissue \d+|\bsessions?\b|\blease\b|\blent\b", page.read_text())
        assert found == [], f"{page.relative_to(ROOT)} narrates history: {found[:5]}"


def _anchors(page: Path) -> set[str]:
    """The heading anchors GitHub makes for a page: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+\s+(.*)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_in_the_docs_resolves():
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            path, _, anchor = target.partition("#")
            dest = (page.parent / path) if path else page
            if target.startswith(("http:", "https:", "mailto:")):
                continue
            if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in _anchors(dest)):
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert missing == []


def test_the_command_reference_is_generated_from_the_cli(capsys, monkeypatch):
    assert (ROOT / "docs" / "reference.md").read_text() == reference(), "run: python docs/make_reference.py"
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert capsys.readouterr().out.strip() in reference()


@pytest.mark.slow
def test_every_command_of_the_readme_runs_as_written(tiny_latent, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    commands = readme_commands()
    assert {c[1] for c in commands} >= {"demo", "experiment", "report", "pretrain-base", "invert", "generate", "verify", "train"}
    # The README's hub id, "downloaded" as a tiny SD-structured model; its data, a tiny folder of the layout it shows.
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(tiny_latent))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bases").mkdir()  # the repository's generalist base; bases/mine is written beside it, here
    (tmp_path / "bases" / "generalist-32-latent").symlink_to(ROOT / "bases" / "generalist-32-latent")
    write_image_tree(tmp_path / "my_images" / "train", per_class=12, size=16)
    write_image_tree(tmp_path / "my_images" / "test", per_class=3, size=16, seed=7)
    write_image_tree(tmp_path / "my_unlabelled", per_class=6, size=16, seed=11)  # a pool for retrieval
    for argv in commands:
        code = main(argv[1:] + TINY.get(argv[1], []))
        assert code == 0, f"{shlex.join(argv)}: {capsys.readouterr().err[-600:]}"
    for study in ("mine", "mine-cpu", "mine-own"):
        assert (tmp_path / "runs" / study / "summary.json").is_file()
    assert (tmp_path / "runs" / "mine" / "report" / "report.html").is_file()


NAMED_FILE = re.compile(r"(?<![\w/.:-])((?:configs|benchmarks|bases|backbones|docs|src|tests)/"
                        r"[\w./-]*\w\.(?:yaml|py|sh|md|json|png|safetensors))")
FROM_HISTORY = re.compile(r"\b([0-9a-f]{7,40}):((?:configs|benchmarks)/[\w./-]*\w\.(?:yaml|py|sh))")


def test_every_repository_file_the_docs_name_exists():
    """A file named plainly exists; one of an older commit (``abc1234:configs/x.yaml``) is in that commit."""
    import subprocess

    missing = sorted({f"{page.relative_to(ROOT)}: {name}" for page in PAGES for name in NAMED_FILE.findall(page.read_text())
                      if not (ROOT / name).exists() and "NAME" not in name})
    assert missing == []
    if not (ROOT / ".git").exists():
        pytest.skip("no git history here to look the older files up in")
    gone = sorted({f"{page.relative_to(ROOT)}: {commit}:{name}" for page in PAGES
                   for commit, name in FROM_HISTORY.findall(page.read_text())
                   if "NAME" not in name
                   and subprocess.run(["git", "cat-file", "-e", f"{commit}:{name}"], cwd=ROOT, capture_output=True).returncode})
    assert gone == []


def test_every_flag_of_a_documented_command_exists():
    from diffinv.cli import build_parser

    parser = build_parser()
    stages = next(a for a in parser._actions if a.dest == "command").choices
    unknown = []
    for page in PAGES:
        text = "\n".join(re.findall(r"```(?:bash|text)?\n(.*?)```", page.read_text(), flags=re.S)).replace("\\\n", " ")
        for line in text.splitlines():
            argv = line.split()
            if len(argv) < 2 or argv[0] not in ("diffinv", ".venv/bin/diffinv") or argv[1] not in stages:
                continue
            known = {s for a in stages[argv[1]]._actions for s in a.option_strings}
            dynamic = ("--invert-", "--generate-", "--train-", "--finetune-", "--filter-")  # a study's per-stage flags
            unknown += [f"{page.relative_to(ROOT)}: diffinv {argv[1]} {f}" for f in argv[2:] if f.startswith("--")
                        and f.split("=")[0] not in known and not f.startswith(dynamic)]
    assert unknown == []
