"""The docs name only what exists: every module, function, class, attribute, CLI option and
repository path that README.md, deploy/README.md and docs/*.md name in code spans resolves.

Our modules are read with ast, not imported (the model and the local backend would pull in torch:
seconds), and CLI options are read from the real typer app. What is checked is what looks like ours:
dotted names under avatarflow/flows/tasks/model, `path.py::name`, `path.py:name`, calls `name(...)`,
CamelCase names, `Class.attr`, repository paths, `--options` and `avatarflow ...` commands; a bare
snake_case name (a parameter, a column, a field) must at least occur somewhere in our code.
"""

from __future__ import annotations

import ast
import builtins
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import typer

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"flows": "avatarflow.flows", "tasks": "avatarflow.tasks", "model": "avatarflow.model"}
CODE_DIRS = ("flows", "tasks", "model", "tests", "bench")
FILE_SUFFIXES = (".py", ".md", ".json", ".yaml", ".yml", ".toml", ".parquet", ".csv", ".jsonl")
FILE_EXTENSIONS = {
    "json",
    "onnx",
    "py",
    "md",
    "yaml",
    "toml",
    "parquet",
    "safetensors",
    "mp4",
    "txt",
}
# Pages about avatarflow itself; the others discuss Prefect's, fal's and the model's own fields.
OUR_PAGES = ("README.md", "deploy/README.md", "docs/design.md")

# Names the shape rules would check that are deliberately not ours, each with why.
EXTERNAL = {
    "DiffusionPipeline": "diffusers' pipeline base class that ours subclasses",
    "ModelMixin": "diffusers' model base class (model.md)",
    "ProcessPoolTaskRunner": "Prefect's task runner, discussed and not used (prefect.md)",
    "DaskTaskRunner": "prefect-dask's task runner, discussed and not used (prefect.md)",
    "RayTaskRunner": "prefect-ray's task runner, discussed and not used (prefect.md)",
    "SubprocessASGIServer": "Prefect's test server class (prefect.md)",
    "ThreadedMotoServer": "moto's in-process S3 server used by the test fakes",
    "FileSystemLockManager": "Prefect's result-lock manager (prefect.md)",
    "EventsWorker": "Prefect's background service named in log notes (prefect.md)",
    "APILogWorker": "Prefect's background service named in log notes (prefect.md)",
    "ParameterSchema": "Prefect's deployment parameter schema (prefect.md)",
    "MissingContextError": "Prefect's exception (prefect.md)",
    "ResultExpiredError": "Prefect/fal-client exception name (prefect.md, fal.md)",
    "CancelledError": "asyncio's exception (prefect.md)",
    "AudioResampler": "PyAV's resampler (media.md)",
    "NotReady": "Prefect's state name for a task whose upstream failed (prefect.md)",
    "TimedOut": "Prefect's state name (prefect.md)",
    "HashError": "Prefect's cache-key exception (prefect.md)",
    "SingleStreamAttention": "upstream LongCat-Video class that model.md maps to ours",
    "MultiHeadCrossAttention": "upstream LongCat-Video class that model.md maps to ours",
    "Wav2Vec2ModelWrapper": "upstream LongCat-Video class that model.md maps to ours",
    "transaction": "Prefect's transactions API, discussed and not used (prefect.md)",
    "gpu_count": "a Kubernetes work pool's job variable (Prefect's base job template)",
    "job_configuration": "a Prefect work pool's base job template section",
}
# Other tools' options that the pages show next to ours.
EXTERNAL_OPTIONS = {
    "--resources": "dask worker: the GPU=1 resource (README, deploy/README.md)",
    "--nthreads": "dask worker (deploy/README.md)",
    "--param": "prefect deployment run (deploy/README.md)",
    "--network": "docker run (deploy/README.md)",
    "--no-deps": "pip install (media.md)",
}
# Members a class inherits from a library base we cannot see without importing it; pydantic
# models are the exception: every field is declared in the class, so their attributes are checked.
PYDANTIC_BASES = {"BaseModel", "BaseSettings"}
PLAIN_BASES = {"ABC", "Protocol", "Generic", "object"}

SPAN = re.compile(r"(`+)(.+?)\1")
DOTTED = re.compile(r"[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)*")
CAMEL = re.compile(r"[A-Z][a-z0-9]+(?:[A-Z][A-Za-z0-9]*)+")
CALL = re.compile(r"([A-Za-z_][\w.]*)\((.*)\)")
OPTION = re.compile(r"--[a-z][a-z0-9-]*")
SNAKE = re.compile(r"_?[a-z][a-z0-9]*(?:_[a-z0-9]+)+")


@dataclass
class ClassInfo:
    module: str
    members: set[str] = field(default_factory=set)
    bases: list[str] = field(default_factory=list)  # qualified when ours, else as written


@dataclass
class ModuleInfo:
    defined: dict[str, ast.AST] = field(default_factory=dict)
    imported: dict[str, str] = field(default_factory=dict)  # local name → qualified name
    is_package: bool = False


@dataclass
class Index:
    """What our code defines, read with ast."""

    modules: dict[str, ModuleInfo] = field(default_factory=dict)
    classes: dict[str, ClassInfo] = field(default_factory=dict)  # qualified name → class
    functions: set[str] = field(default_factory=set)  # every def name, methods included
    decorated: set[str] = field(default_factory=set)  # qualified names of @task / @flow functions
    external: set[str] = field(default_factory=set)  # names our code imports from libraries
    used: set[str] = field(default_factory=set)  # every attribute our code reads (library methods)
    words: set[str] = field(default_factory=set)  # every identifier-like word in our files

    def classes_named(self, name: str) -> list[str]:
        return [q for q in self.classes if q.rsplit(".", 1)[-1] == name]

    def members(self, qualname: str) -> tuple[set[str], bool]:
        """A class's members, inherited ones included, and whether a library base may add more."""
        info = self.classes[qualname]
        found, open_ended = set(info.members), False
        for base in info.bases:
            if base in self.classes:
                inherited, more = self.members(base)
                found |= inherited
                open_ended |= more
            elif base.rsplit(".", 1)[-1] in PYDANTIC_BASES:
                found |= {"model_validate", "model_copy", "model_dump", "model_fields"}
            elif base.rsplit(".", 1)[-1] not in PLAIN_BASES:
                open_ended = True
        return found, open_ended


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGES.get(parts[0], parts[0]), *parts[1:]])


def _class_members(node: ast.ClassDef) -> set[str]:
    members: set[str] = set()
    for item in node.body:
        if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            members.add(item.name)
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            members.add(item.target.id)
        elif isinstance(item, ast.Assign):
            members |= {t.id for t in item.targets if isinstance(t, ast.Name)}
    for sub in ast.walk(node):  # instance attributes: self.x = ...
        if (
            isinstance(sub, ast.Attribute)
            and isinstance(sub.ctx, ast.Store)
            and isinstance(sub.value, ast.Name)
            and sub.value.id in ("self", "cls")
        ):
            members.add(sub.attr)
    return members


def _is_prefect_decorated(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    for dec in node.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        if isinstance(target, ast.Name) and target.id in ("task", "flow"):
            return True
    return False


@cache
def build_index() -> Index:
    """Index what our Python files define, import and use, and every word of our code."""
    index = Index(external=set(dir(builtins)))
    sources = [p for folder in CODE_DIRS for p in sorted((ROOT / folder).rglob("*.py"))]
    trees = {module_name(p): (ast.parse(p.read_text()), p) for p in sources}
    for name, (tree, path) in trees.items():
        info = index.modules[name] = ModuleInfo(is_package=path.name == "__init__.py")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    info.imported[alias.asname or alias.name] = target
                    if not node.module.startswith("avatarflow"):
                        index.external.add(alias.name)
            elif isinstance(node, ast.Import):
                index.external |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                index.functions.add(node.name)
            elif isinstance(node, ast.Attribute):
                index.used.add(node.attr)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                info.defined[node.name] = node
                if not isinstance(node, ast.ClassDef) and _is_prefect_decorated(node):
                    index.decorated.add(f"{name}.{node.name}")
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name):
                        info.defined[t.id] = t
    for name, info in index.modules.items():
        for local, node in info.defined.items():
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b).split("[")[0] for b in node.bases]
                qualified = [_qualify(index, name, b) for b in bases]
                index.classes[f"{name}.{local}"] = ClassInfo(name, _class_members(node), qualified)
    for folder in (*CODE_DIRS, "deploy"):
        for path in (ROOT / folder).rglob("*"):
            if path == Path(__file__):  # this file names what must not exist
                continue
            if path.suffix in (".py", ".yaml", ".toml") or path.name == "Dockerfile":
                index.words |= set(re.findall(r"\w+", path.read_text(errors="replace")))
    for path in (ROOT / "pyproject.toml", ROOT / "Makefile"):
        index.words |= set(re.findall(r"\w+", path.read_text()))
    return index


def _qualify(index: Index, module: str, name: str) -> str:
    """A name as used in module, qualified when it is one of ours."""
    info = index.modules[module]
    head, _, rest = name.partition(".")
    if head in info.defined:
        return f"{module}.{name}"
    if head in info.imported:
        return ".".join(filter(None, [info.imported[head], rest]))
    return name


def resolve(index: Index, dotted: str) -> str | None:
    """Why a dotted name under avatarflow does not resolve, or None when it does."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        if module in index.modules:
            return _resolve_in(index, module, parts[cut:])
    return f"no module {'.'.join(parts[:3])}"


def _resolve_in(index: Index, module: str, attrs: list[str]) -> str | None:
    if not attrs:
        return None
    info, name = index.modules[module], attrs[0]
    if name in info.defined:
        qualified = f"{module}.{name}"
    elif name in info.imported and info.is_package:  # a package re-exports what it imports
        qualified = info.imported[name]
        if not qualified.startswith("avatarflow"):
            return None
        target, _, attr = qualified.rpartition(".")
        if target in index.modules:
            return _resolve_in(index, target, [attr, *attrs[1:]])
        return None
    elif name in index.modules.get(f"{module}.{name}", ModuleInfo()).defined or (
        f"{module}.{name}" in index.modules
    ):
        return _resolve_in(index, f"{module}.{name}", attrs[1:])
    else:
        return f"{module} has no {name}"
    if len(attrs) == 1:
        return None
    if qualified in index.classes:
        return _resolve_member(index, qualified, attrs[1:])
    if qualified in index.decorated:
        return None  # a Prefect task or flow: .submit, .fn, .with_options are Prefect's
    return f"{qualified} has no attribute {attrs[1]}"


def _resolve_member(index: Index, qualified: str, attrs: list[str]) -> str | None:
    members, open_ended = index.members(qualified)
    if attrs[0] in members or open_ended:
        return None
    return f"{qualified.rsplit('.', 1)[-1]} has no attribute {attrs[0]}"


def resolve_bare(index: Index, dotted: str) -> str | None:
    """A name written without its module: `Ledger`, `Ledger.lock`, `run_batch`."""
    head, *attrs = dotted.split(".")
    classes = index.classes_named(head)
    if classes:
        if not attrs:
            return None
        problems = [_resolve_member(index, q, attrs) for q in classes]
        return None if None in problems else problems[0]
    defined = any(head in m.defined for m in index.modules.values())
    if (defined or head in index.functions) and not attrs:
        return None
    if defined:
        owners = [f"{m}.{head}" for m, info in index.modules.items() if head in info.defined]
        return None if any(q in index.decorated for q in owners) else f"{head} has no {attrs[0]}"
    if head in index.external or head in index.used or head in EXTERNAL:
        return None  # a library's name that our code imports or calls
    return f"no class or function {head} in avatarflow"


@cache
def cli_options() -> dict[tuple[str, ...], set[str]]:
    """Every command path of the real typer app → its options."""
    from avatarflow.flows.cli import app

    found: dict[tuple[str, ...], set[str]] = {}

    def walk(command: Any, path: tuple[str, ...]) -> None:  # typer vendors its own click
        opts = {"--help"}
        for param in command.params:
            opts |= {*param.opts, *param.secondary_opts}
        found[path] = opts
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return found


def check_command(words: list[str]) -> str | None:
    """`avatarflow <command...> [args] [--options]`: the command exists and takes those options."""
    commands = cli_options()
    path: tuple[str, ...] = ()
    for word in words:
        if (*path, word) in commands:
            path = (*path, word)
        elif not word.startswith("-"):
            break
    if not path and words and not words[0].startswith("-"):
        return f"avatarflow has no command {words[0]}"
    unknown = [o for o in OPTION.findall(" ".join(words)) if o not in commands[path]]
    if unknown:
        return f"avatarflow {' '.join(path)} has no option {', '.join(unknown)}"
    return None


def check_path(index: Index, text: str) -> str | None:
    """A repository path, optionally with `::name` or `:name` inside a Python file."""
    path, sep, name = text.partition("::")
    if not sep and re.fullmatch(r"[\w./-]+\.py:[\w.]+", text):
        path, _, name = text.partition(":")
    if not (ROOT / path).exists():
        return f"no file {path}"
    if name:
        if not path.endswith(".py") or path.split("/")[0] not in CODE_DIRS:
            return None
        return resolve(index, f"{module_name(ROOT / path)}.{name}")
    return None


def _is_repo_path(text: str) -> bool:
    if any(c in text for c in "<>{}*…$ ") or "://" in text:
        return False
    head = text.split("::")[0].split(":")[0].split("/")[0]
    top = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")}
    return head in top and ("/" in text or "::" in text or head.endswith(FILE_SUFFIXES))


def check_span(index: Index, text: str, weak: bool = True) -> str | None:
    """Why a code span names something that does not exist, or None (also for what is not ours).

    weak: also require every bare snake_case name to occur somewhere in our code.
    """
    text = text.strip()
    command = re.match(r"(?:\$ )?(?:\S*/)?avatarflow\s+(.+)", text)
    if command:
        return check_command(command.group(1).split())
    if OPTION.fullmatch(text.split()[0]) and not text.startswith("---"):
        known = set().union(*cli_options().values(), EXTERNAL_OPTIONS)
        return None if text.split()[0] in known else f"avatarflow has no option {text.split()[0]}"
    if _is_repo_path(text):
        return check_path(index, text)
    call = CALL.fullmatch(text)
    name = call.group(1) if call else text.removesuffix("()")
    if ":" in name and re.fullmatch(r"avatarflow[\w.]*:[\w.]+", name):
        name = name.replace(":", ".")
    if not DOTTED.fullmatch(name) or name.rsplit(".", 1)[-1] in FILE_EXTENSIONS:
        return None  # not a Python name, or a file name
    head = name.split(".")[0]
    if head == "avatarflow" and "." in name:
        return resolve(index, name)
    if head in PACKAGES and "." in name:
        return resolve(index, f"avatarflow.{name}")
    if head.isupper() or head in ("self", "cls") or name in EXTERNAL:
        return None  # constants, env vars, HTTP verbs
    if head[0].isupper() and ("." in name or CAMEL.fullmatch(head)):
        return resolve_bare(index, name)
    if "." not in name and head[0].islower() and (call or text.endswith("()")):
        return resolve_bare(index, name)
    if name.startswith("test_") and "." not in name and name not in index.functions:
        return f"no test {name}"
    if weak and SNAKE.fullmatch(name) and name not in index.words:
        return f"{name} occurs nowhere in the code"
    return None


def spans(markdown: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of every inline code span, and of every command, import or path in a
    fenced block (continuation lines joined)."""
    fenced, pending, start = False, "", 0
    for number, line in enumerate(markdown.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            for match in SPAN.finditer(line):
                yield number, match.group(2)
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        whole, pending = (pending + line).strip(), ""
        whole = whole.split(" #", 1)[0].strip()  # a shell comment
        imported = re.fullmatch(r"from (avatarflow[\w.]*) import (.+)", whole)
        if imported:
            for name in imported.group(2).strip("()").split(","):
                yield start, f"{imported.group(1)}.{name.split(' as ')[0].strip()}"
        elif re.match(r"(?:\$ )?(?:\S*/)?avatarflow\s", whole):
            yield start, whole
        else:
            for word in whole.split():
                if _is_repo_path(word.strip("\"'(),")):
                    yield start, word.strip("\"'(),")


def check_markdown(index: Index, name: str, markdown: str, weak: bool = True) -> list[str]:
    """Every miss in one markdown text, as `name:line: `span`: reason`."""
    misses = []
    for number, text in spans(markdown):
        problem = check_span(index, text, weak)
        if problem:
            misses.append(f"{name}:{number}: `{text}`: {problem}")
    return misses


def documents() -> list[Path]:
    return [
        ROOT / "README.md",
        ROOT / "deploy" / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
    ]


def test_docs_name_only_what_exists() -> None:
    index = build_index()
    misses = []
    for doc in documents():
        name = doc.relative_to(ROOT).as_posix()
        misses += check_markdown(index, name, doc.read_text(), weak=name in OUR_PAGES)
    assert not misses, "the docs name what the code does not have:\n" + "\n".join(misses)


def test_a_renamed_or_missing_name_is_reported() -> None:
    markdown = "\n".join(
        [
            "Good: `tasks/ledger.py::Ledger.lock`, `avatarflow.flows.produce.run_batch`,",
            "`Ledger.record_attempt`, `run_batch()`, `avatarflow run --budget`, `--dask-address`,",
            "`deploy/prefect.yaml`, `budget_usd`, `FalSettings.api_key()`, `prefect deploy --all`.",
            "Bad: `tasks/ledger.py::Ledger.unlock`, `avatarflow.flows.produce.run_batches`,",
            "`FalSettings.key`, `budget_gate`, `test_no_such_behaviour`,"
            " `avatarflow run --no-such-option`, `flows/nope.py`.",
            "```bash",
            "avatarflow plan manifests/examples/demo.parquet \\",
            "  --backend fal --qc-skip face",
            "```",
        ]
    )
    misses = check_markdown(build_index(), "fake.md", markdown)
    lines = ["fake.md:4"] * 2 + ["fake.md:5"] * 5 + ["fake.md:7"]
    assert [m.split(": ", 1)[0] for m in misses] == lines, misses
    reported = "\n".join(misses)
    for bad in (
        "Ledger.unlock",
        "run_batches",
        "FalSettings.key",
        "budget_gate",
        "test_no_such_behaviour",
        "--no-such-option",
        "flows/nope.py",
        "plan has no option --qc-skip",
    ):
        assert bad in reported
