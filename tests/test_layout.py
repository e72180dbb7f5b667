"""The repo's shape, as a newcomer relies on it: scripts share code through library files and never
import one another, so any behaviour lives in one obvious file."""
import ast

from conftest import ROOT

SCRIPTS = {"train", "generate", "app", "evaluate", "bench", "prepare"}


def imported_modules(path) -> set[str]:
    """Top-level names of every module a file imports, at any depth (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def is_script(path) -> bool:
    return 'if __name__ == "__main__":' in path.read_text(encoding="utf-8")


def test_the_scripts_are_the_files_that_run():
    assert {p.stem for p in ROOT.glob("*.py") if is_script(p)} == SCRIPTS


def test_no_file_imports_a_script():
    offenders = {p.name: sorted(imported_modules(p) & SCRIPTS) for p in sorted(ROOT.glob("*.py"))}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("def f():\n    from train import parse_args\n    import generate as g\n")
    assert imported_modules(sneaky) >= {"train", "generate"}
