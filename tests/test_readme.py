"""The README's and docs' promises: CI runs the README's test command, its first command sets up
and runs the default, and everything the pages name is there.

The pages checked are README.md, docs/*.md, launch/README.md and ds_configs/README.md:

* every relative link resolves, anchors included;
* every path under the project's folders they name exists, every test file they name exists,
  and the README's Layout lists every module of the library (the one place that lists them);
* docs/SETTINGS.md documents every config key with its dataclass default, and nothing else;
* every ``dotted.key=value`` example loads with ``loradrop_ds.config.load_config`` (with the
  recipe its command line names): a whole command line of a code block together, an inline
  code span on its own. The few examples the docs give as refused must be refused.
  docs/BENCHMARKS.md records runs whose full commands it gives, and its prose is frozen: its
  inline spans are checked for keys and types only;
* every ``--option`` given to ``launch/*.py`` exists in that script, and the export and planner
  pages document every option of their script;
* every ``loradrop_ds.module.name`` they mention imports.

Nothing here starts a process group or loads a model: a few seconds.
"""

import dataclasses
import importlib
import re
import shlex
from pathlib import Path

import pytest
import yaml

from loradrop_ds import config as config_lib
from loradrop_ds.cli import resolve_recipe

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md")), REPO / "launch" / "README.md", REPO / "ds_configs" / "README.md"]
FROZEN = {REPO / "docs" / "BENCHMARKS.md"}  # numbers and prose stay as measured (see the module docstring)

# Paths the docs name that are not in the repository, and why.
NOT_IN_REPO = {
    "launch/hostfile": "the user copies launch/hostfile.example to it",
    "bench/results/prune_seedS.json": "S stands for the seed (docs/BENCHMARKS.md, section 6)",
}
# Override examples the docs give as refused; each must be refused by load_config.
REFUSED = {
    "model.dtype=float16": "fp16 with fp32 adapters (ds_configs/README.md, Precision)",
}
PROJECT_DIRS = ("launch", "recipes", "ds_configs", "bench", "scripts", "tests", "data", "docs", "loradrop_ds")
PATH_RE = re.compile(r"(?<![\w./~$<-])((?:" + "|".join(PROJECT_DIRS) + r")/[\w./-]*\w)")
FENCE_RE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.S | re.M)
SPAN_RE = re.compile(r"`([^`\n]+)`")
LINK_RE = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
TOP_KEYS = tuple(f.name for f in dataclasses.fields(config_lib.Config))
OVERRIDE_RE = re.compile(r"^(?:" + "|".join(TOP_KEYS) + r")(?:\.\w+)*=")
SCRIPTS = {name: REPO / "launch" / name for name in ("train.py", "export.py", "plan.py")}


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def _rel(page: Path) -> str:
    return str(page.relative_to(REPO))


def _prose(text: str) -> str:
    """The page without its fenced code blocks."""
    return FENCE_RE.sub("", text)


def _fenced(text: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in FENCE_RE.finditer(text)]


def _command_lines(text: str) -> list[str]:
    """Lines of the page's bash/sh code blocks, continuation lines joined."""
    lines = []
    for lang, body in _fenced(text):
        if lang in ("bash", "sh"):
            lines += [line for line in body.replace("\\\n", " ").splitlines() if line.strip()]
    return lines


def _split(text: str) -> list[str]:
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # an apostrophe in prose
        return text.split()


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} +(.+?) *#*$", _prose(_text(page)), flags=re.M):
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


# --------------------------------------------------------------------------- the two commands


def test_ci_runs_the_readme_test_command():
    readme = README.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    test_cmd = next(b.strip() for b in blocks if "pytest" in b)
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci_lines


def test_readme_default_command_uses_the_entry_point_and_setup():
    readme = README.read_text()
    first = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)[0].strip()
    assert first.startswith("bash scripts/setup.sh") and "launch/train.py" in first
    assert (REPO / "scripts" / "setup.sh").is_file() and (REPO / "launch" / "train.py").is_file()


# --------------------------------------------------------------------------- links and paths


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK_RE.findall(re.sub(SPAN_RE, "", _prose(_text(page)))):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                broken.append(f"{_rel(page)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{_rel(page)}: {target} (no heading with that anchor in {dest.name})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def _is_placeholder(path: str) -> bool:
    """``recipes/NAME.yaml``, ``bench/out/...`` (what a command writes, git-ignored), NOT_IN_REPO."""
    stems = [Path(part).stem for part in path.split("/")]
    return (any(s.isupper() and len(s) > 1 for s in stems) or path == "bench/out" or path.startswith("bench/out/")
            or path in NOT_IN_REPO)


def test_every_named_path_exists():
    missing = []
    for page in PAGES:
        for path in sorted(set(PATH_RE.findall(_text(page)))):
            path = path.rstrip(".")
            if not _is_placeholder(path) and not (REPO / path).exists():
                missing.append(f"{_rel(page)}: {path}")
    assert not missing, "paths named in the docs that do not exist:\n" + "\n".join(missing)


def test_every_named_test_file_exists_and_every_test_file_is_described():
    test_files = {p.name for p in (REPO / "tests").rglob("test_*.py")}
    missing = [f"{_rel(page)}: {name}" for page in PAGES
               for name in sorted(set(re.findall(r"\btest_\w+\.py\b", _text(page)))) if name not in test_files]
    assert not missing, "test files named in the docs that do not exist:\n" + "\n".join(missing)
    described = set(re.findall(r"\btest_\w+\.py\b", _text(REPO / "docs" / "TESTS.md")))
    assert not test_files - described, f"docs/TESTS.md does not describe {sorted(test_files - described)}"


def _layout() -> str:
    text = _text(README)
    start = text.index("\n## Layout")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_readme_layout_lists_every_library_module():
    layout = _layout()
    package = REPO / "loradrop_ds"
    modules = [f"loradrop_ds/{p.name}" for p in package.glob("*.py") if p.name != "__init__.py"]
    modules += [f"loradrop_ds/{p.name}/" for p in package.iterdir() if (p / "__init__.py").is_file()]
    unlisted = sorted(m for m in modules if f"`{m}`" not in layout and f"`{m.rstrip('/')}`" not in layout)
    assert not unlisted, f"README's Layout does not list {unlisted}"
    listed = re.findall(r"`(loradrop_ds/[\w/.]+)`", layout)
    gone = [m for m in listed if not (REPO / m).exists()]
    assert not gone, f"README's Layout lists modules that do not exist: {gone}"


def test_named_library_objects_import():
    missing = []
    for page in PAGES:
        for dotted in sorted(set(re.findall(r"\bloradrop_ds(?:\.\w+)+", _text(page)))):
            parts = dotted.split(".")
            for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                except ImportError:
                    continue
                for attr in parts[cut:]:
                    obj = getattr(obj, attr, None)
                if obj is None:
                    missing.append(f"{_rel(page)}: {dotted}")
                break
    assert not missing, "library names in the docs that do not exist:\n" + "\n".join(missing)


# --------------------------------------------------------------------------- settings


def _flat_defaults() -> dict:
    return config_lib.dotted(config_lib.to_dict(config_lib.Config()))


def _documented_settings() -> list[tuple[str, str]]:
    rows = re.findall(r"^\| `([\w.]+)` \| `([^`]*)` \|", _text(REPO / "docs" / "SETTINGS.md"), flags=re.M)
    assert rows, "docs/SETTINGS.md has no `key` | `default` rows"
    return rows


def test_settings_page_documents_every_key_with_its_default():
    defaults = _flat_defaults()
    rows = _documented_settings()
    keys = [key for key, _ in rows]
    assert len(keys) == len(set(keys)), f"documented twice: {sorted({k for k in keys if keys.count(k) > 1})}"
    unknown = sorted(set(keys) - set(defaults))
    assert not unknown, f"docs/SETTINGS.md documents keys the config does not have: {unknown}"
    undocumented = sorted(set(defaults) - set(keys))
    assert not undocumented, f"docs/SETTINGS.md does not document: {undocumented}"
    wrong = [f"{key}: page says {shown!r}, config has {defaults[key]!r}" for key, shown in rows
             if yaml.safe_load(shown) != defaults[key]]
    assert not wrong, "defaults on docs/SETTINGS.md that differ from the config:\n" + "\n".join(wrong)


# --------------------------------------------------------------------------- override examples


def _examples(page: Path) -> list[tuple[str | None, list[str], bool]]:
    """(recipe or None, overrides, full check) for every command line and inline span that
    gives ``dotted.key=value`` settings."""
    text = _text(page)
    found = []
    for line in _command_lines(text):
        tokens = _split(line)
        overrides = [t for t in tokens if OVERRIDE_RE.match(t) and "<" not in t]
        if not overrides:
            continue
        recipe = next((t for t in tokens if re.fullmatch(r"recipes/[\w.-]+\.ya?ml", t)), None)
        if "--config" in tokens[:-1]:
            recipe = tokens[tokens.index("--config") + 1]
        found.append((recipe, overrides, True))
    for span in SPAN_RE.findall(_prose(text)):
        overrides = [t for t in _split(span) if OVERRIDE_RE.match(t) and "<" not in t]
        if overrides:
            found.append((None, overrides, page not in FROZEN))
    return found


def test_override_examples_load():
    bad = []
    refused_seen = set()
    for page in PAGES:
        for recipe, overrides, full in _examples(page):
            where = f"{_rel(page)}: {' '.join(overrides)}" + (f" (--config {recipe})" if recipe else "")
            path = resolve_recipe(recipe) if recipe else None
            try:
                if full:
                    config_lib.load_config(path, overrides)
                else:  # keys and types only
                    tree = config_lib._merge(config_lib.to_dict(config_lib.Config()),
                                             config_lib.parse_overrides(overrides))
                    config_lib._from_dict(config_lib.Config, tree)
            except config_lib.ConfigError as e:
                if " ".join(overrides) in REFUSED and recipe is None:
                    refused_seen.add(" ".join(overrides))
                    continue
                bad.append(f"{where}: {e}")
            else:
                if " ".join(overrides) in REFUSED and full:
                    bad.append(f"{where}: the docs say this is refused, but it loads")
    assert not bad, "override examples that do not load:\n" + "\n".join(bad)
    assert refused_seen == set(REFUSED), f"refused examples no page gives any more: {set(REFUSED) - refused_seen}"


@pytest.mark.parametrize("example", sorted(REFUSED))
def test_refused_examples_are_refused(example):
    with pytest.raises(config_lib.ConfigError):
        config_lib.load_config(None, example.split())


# --------------------------------------------------------------------------- script options


def _options(script: Path) -> set[str]:
    return set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", script.read_text()))


def test_options_given_to_the_launch_scripts_exist():
    bad = []
    for page in PAGES:
        for line in _command_lines(_text(page)):
            tokens = _split(line)
            for i, token in enumerate(tokens):
                name = Path(token).name
                if token.startswith("launch/") and name in SCRIPTS:
                    for option in tokens[i + 1:]:
                        if option in ("&&", "||", "|", ";"):
                            break
                        flag = option.split("=", 1)[0]
                        if flag.startswith("--") and flag not in _options(SCRIPTS[name]):
                            bad.append(f"{_rel(page)}: launch/{name} {flag}")
    assert not bad, "options the launch scripts do not have:\n" + "\n".join(bad)


@pytest.mark.parametrize("page,script", [("EXPORT.md", "export.py"), ("PLANNER.md", "plan.py")])
def test_option_pages_match_their_script(page, script):
    text = _text(REPO / "docs" / page)
    mentioned = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", text)) - {"--help"}
    options = _options(SCRIPTS[script]) - {"--help"}
    assert not mentioned - options, f"docs/{page} names options launch/{script} lacks: {sorted(mentioned - options)}"
    assert not options - mentioned, f"docs/{page} does not document {sorted(options - mentioned)}"
