"""Each DVC stage depends on the code it runs, as a run of the stage shows it.

Every stage's `cmd` from dvc.yaml runs on a small project, in dependency order (two independent
stages at a time), each in a process of its own under a global trace function that notes the source
file of every function body called. Each process is forked from a zygote that has imported the
third-party packages the project's code imports, untraced (their import is no stage's code, and,
traced anew in every stage's process, it was most of this test's time), and nothing of pipeline/ or
stages/: the stage imports those afresh, as the fresh process DVC starts does.

A file of pipeline/ or stages/ counts only when code of one of its functions runs outside the import
of a project module: the registries (models/, encoders/) import every model and encoder, and
registering them is no stage's work, so the trace sees only the model and encoder a stage actually
uses.

A module that defines no function (constants, exception classes, plain dataclasses) has no code
for a trace to see, so such a module counts whenever the stage imports it: its values may have
been read. A package's `__init__` is not counted that way: it gathers its modules, and what code
of its own runs is traced. Not seen: a module with functions of which a stage reads only constants.

Every module a stage runs must lie under one of its deps (the file, or a folder above it): a missing
one leaves stale outputs after it changes. A stage may depend on a little more than it runs (a
whole folder), never on another model's own code: the baseline's stages never on ViCLIPCap's.
"""

from __future__ import annotations

import ast
import functools
import json
import operator
import queue
import re
import shlex
import subprocess
import sys
import tempfile
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import pytest

from pipeline.core.config import dump_config, load_config, yaml_parser

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

# The zygote: imports the statements in argv[2], then for each line [output file, args] on stdin forks a child
# that runs `viclip ARGS...` as pipeline.cli.main() under the trace and prints what ran and what was imported
# (paths relative to the checkout) as JSON on its last line of output; answers with the child's exit status.
ZYGOTE = """
import inspect, json, os, sys, threading, traceback

root, imports = sys.argv[1], json.loads(sys.argv[2])
for statement in imports:
    try:
        exec(statement, {})
    except Exception:  # an optional package this machine lacks: a stage that needs it fails on its own
        pass
code = tuple(os.path.join(root, package, "") for package in ("pipeline", "stages"))
# Forking is safe with one thread only; and the stages must import the project's modules themselves.
assert threading.active_count() == 1 and len(os.listdir("/proc/self/task")) == 1, "an import started a thread"
assert not any((getattr(m, "__file__", None) or "").startswith(code) for m in list(sys.modules.values()))


# Calls made while a project module is imported (registering a model, say) are no stage's work.
def importing(frame):
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_code.co_filename.startswith(code):
            return True
        frame = frame.f_back
    return False


def stage(args):
    ran = set()

    def trace(frame, event, arg):
        path = frame.f_code.co_filename
        # CO_OPTIMIZED: a function body, not a module or class body. Returning None asks for no line events.
        if path not in ran and path.startswith(code) and frame.f_code.co_flags & inspect.CO_OPTIMIZED \\
                and not importing(frame):
            ran.add(path)

    sys.argv = ["viclip", *args]
    sys.settrace(trace)
    threading.settrace(trace)
    from pipeline.cli import main

    try:
        main()
    finally:  # the CLI ends with sys.exit, also on success
        sys.settrace(None)
        imported = {getattr(m, "__file__", None) or "" for m in list(sys.modules.values())}
        print(json.dumps({
            "ran": sorted(os.path.relpath(p, root) for p in ran),
            "imported": sorted(os.path.relpath(p, root) for p in imported if p.startswith(code)),
        }))


for line in sys.stdin:
    output, args = json.loads(line)
    child = os.fork()
    if child == 0:
        status = 1
        try:
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the requests are the zygote's
            written = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(written, 1)
            os.dup2(written, 2)
            stage(args)
        except SystemExit as exit:  # as the interpreter ends: a message is printed, exit status 1
            if isinstance(exit.code, int) or exit.code is None:
                status = exit.code or 0
            else:
                print(exit.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:  # the child never returns to the zygote's loop
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    print(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]), flush=True)
"""


def third_party_imports() -> list[str]:
    """Every import statement of pipeline/ and stages/ that names none of their modules, as source."""
    statements = set()
    for path in sorted([*(ROOT / "pipeline").rglob("*.py"), *(ROOT / "stages").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            if not any(module.split(".")[0] in ("pipeline", "stages", "__future__") for module in modules):
                statements.add(ast.unparse(node))
    return sorted(statements)


def defines_no_function(path: str) -> bool:
    """Whether a module (not a package's `__init__`) holds only values: no code that a trace could see run."""
    source = ROOT / path
    if source.name == "__init__.py":
        return False
    tree = ast.parse(source.read_text(encoding="utf-8"), path)
    return not any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) for node in ast.walk(tree))


def run_stage(cmd: str, zygotes: queue.SimpleQueue, output: Path) -> set[str]:
    """The code files the stage's command ran, or imported and could only read values from."""
    program, *args = shlex.split(cmd)
    assert program == "viclip", cmd
    zygote = zygotes.get()
    try:
        zygote.stdin.write(json.dumps([str(output), args]) + "\n")
        zygote.stdin.flush()
        status = zygote.stdout.readline()
    finally:
        zygotes.put(zygote)
    text = output.read_text() if output.exists() else ""
    assert status, f"{cmd}: the zygote ended (exit status {zygote.wait()})"
    assert int(status) == 0, f"{cmd}:\n{text}"
    trace = json.loads(text.splitlines()[-1])
    return set(trace["ran"]) | {path for path in trace["imported"] if defines_no_function(path)}


def paths_of(entries: list, params: dict) -> set[str]:
    """A stage's deps or outs (plain, or a mapping to options) with ${section.key} filled in from params."""
    def value(match: re.Match) -> str:
        return str(functools.reduce(operator.getitem, match.group(1).split("."), params))
    names = [entry if isinstance(entry, str) else next(iter(entry)) for entry in entries]
    return {re.sub(r"\$\{([^}]+)\}", value, name) for name in names}


def run_stages(stages: dict, params: dict, cwd: Path, at_once: int = 2) -> dict[str, set[str]]:
    """Each stage's code, a stage started once every stage whose outputs it reads has finished."""
    outs = {name: paths_of([*s.get("outs", []), *s.get("metrics", []), *s.get("plots", [])], params)
            for name, s in stages.items()}
    needs = {
        name: {other for other in stages for dep in paths_of(stage["deps"], params) for out in outs[other]
               if dep == out or dep.startswith(f"{out}/")}
        for name, stage in stages.items()
    }
    zygotes = queue.SimpleQueue()
    started = [subprocess.Popen([sys.executable, "-c", ZYGOTE, str(ROOT), json.dumps(third_party_imports())],
                                cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for _ in range(at_once)]
    for zygote in started:
        zygotes.put(zygote)
    pending, running, code = list(stages), {}, {}
    try:
        with tempfile.TemporaryDirectory() as outputs, ThreadPoolExecutor(at_once) as pool:
            while pending or running:
                for name in [n for n in pending if needs[n] <= code.keys()][: at_once - len(running)]:
                    pending.remove(name)
                    running[pool.submit(run_stage, stages[name]["cmd"], zygotes, Path(outputs) / name)] = name
                assert running, f"stages waiting on each other: {pending}"
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    code[running.pop(future)] = future.result()
    finally:
        for zygote in started:
            zygote.stdin.close()
            zygote.wait()
    return code


def test_each_stage_lists_the_code_it_runs(project, subtests):
    # Image decoding runs in the stage's own process, where the trace sees it, not in untraced workers.
    params = load_config(project / "params.yaml").model_dump()
    params["extract"]["num_workers"] = 0
    (project / "params.yaml").write_text(dump_config(params))

    stages = yaml_parser().load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    code = run_stages(stages, params, project)

    # The trace tells the models and encoders apart; were it to see every registry entry, or
    # nothing, the comparison below would prove little.
    assert "pipeline/models/viclipcap/captioner.py" in code["train_viclipcap"]
    assert "pipeline/models/cnn_lstm.py" not in code["train_viclipcap"]
    assert "pipeline/encoders/cnn.py" in code["extract_cnn"]
    assert "pipeline/encoders/clip.py" not in code["extract_cnn"]

    for name, stage in stages.items():
        with subtests.test(stage=name):
            deps = paths_of(stage["deps"], params)
            uncovered = sorted(path for path in code[name] if not covered(path, deps))
            assert not uncovered, f"runs code no dep covers: {uncovered}"
    for name in ("extract_cnn", "train_cnn_lstm", "score_cnn_lstm"):
        assert not covered(VICLIPCAP, paths_of(stages[name]["deps"], params)), name


VICLIPCAP = "pipeline/models/viclipcap/captioner.py"


def covered(path: str, deps: set[str]) -> bool:
    """Whether a change to `path` changes one of `deps`: the file itself, or a folder above it."""
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def test_the_cover_check_tells_folders_from_prefixes():
    assert covered("pipeline/models/viclipcap/lm.py", {"pipeline/models/viclipcap"})
    assert not covered("pipeline/models/viclipcap_extra.py", {"pipeline/models/viclipcap"})
    assert not covered("pipeline/models/base.py", {"pipeline/models/cnn_lstm.py"})
