"""Issue 15: the CLI lists its commands itself (name -> module, imported when the command runs), so no
library module imports `moe_offload.cli`, and `moe-offload --help` imports no command module and no torch."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from moe_offload import cli
from tests.conftest import CHILD_ENV

PACKAGE = Path(__file__).resolve().parents[1] / "moe_offload"


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function, as absolute dotted names (a
    `from . import x` counts as importing both the package and `package.x`)."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    package = parts[:-1]  # a module's package; for __init__.py the package itself
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join([*base, *([node.module] if node.module else [])])
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def test_the_import_parser_resolves_relative_imports():
    """The checker itself: relative imports at the top and inside functions, and in a package's __init__."""
    found = imported_modules(PACKAGE / "store" / "cli.py")
    assert {"moe_offload.hub", "moe_offload.store.format"} <= found  # the second inside a function
    assert "moe_offload.quant.codec" in imported_modules(PACKAGE / "quant" / "__init__.py")
    assert "moe_offload.runtime.load" in imported_modules(PACKAGE / "__init__.py")


def test_no_library_module_imports_the_cli():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in ("cli.py", "__main__.py"):
            continue
        hits = sorted(m for m in imported_modules(path)
                      if m == "moe_offload.cli" or m.startswith("moe_offload.cli."))
        if hits:
            offenders[rel] = hits
    assert offenders == {}, "library modules must not import moe_offload.cli (list them in cli.COMMANDS)"


def test_top_level_help_lists_every_command_without_importing_them():
    code = (
        "import sys, json, contextlib, io\n"
        "from moe_offload.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit as e:\n"
        "        code = e.code\n"
        "print(json.dumps({'code': code, 'help': out.getvalue(), 'modules': sorted(sys.modules)}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=CHILD_ENV,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["code"] == 0
    text = " ".join(got["help"].split())
    for name, (_, help_text) in cli.COMMANDS.items():
        assert f"{name} {' '.join(help_text.split())}" in text, name
    modules = set(got["modules"])
    assert "torch" not in modules
    command_modules = {m.partition(":")[0] for m, _ in cli.COMMANDS.values()} - {"moe_offload.cli"}
    assert not modules & command_modules, sorted(modules & command_modules)


def test_one_command_imports_its_module_only():
    code = ("import sys\nfrom moe_offload.cli import main\n"
            "try:\n    main(['plan', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('moe_offload'))))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=CHILD_ENV,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    loaded = set(r.stdout.split()[-200:])
    assert "moe_offload.plan" in loaded
    assert not loaded & {"moe_offload.server", "moe_offload.bench", "moe_offload.quant.cli",
                          "moe_offload.eval"}


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_table_entry_has_add_args_and_run(name):
    module, help_text = cli.COMMANDS[name]
    assert help_text and "\n" not in help_text
    add_args, run = cli.entry_points(name)
    mod = importlib.import_module(module.partition(":")[0])
    assert callable(add_args) and callable(run)
    assert getattr(mod, add_args.__name__) is add_args and getattr(mod, run.__name__) is run


def test_an_unknown_command_is_one_line_naming_the_choices(capsys):
    assert cli.main(["genrate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'genrate'" in err[0] and "generate" in err[0]
