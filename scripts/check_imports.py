"""Import every module of the project: `python scripts/check_imports.py`.

CI runs it right after `pip install -e .` in a fresh virtual environment, before the test extra is
installed, so a runtime import that pyproject.toml does not declare (numpy once) fails there with
its name instead of on a user's first `python scripts/train.py`. Optional imports live inside the
functions that need them and are not reached here.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "kernels", "models")


def project_modules() -> list[str]:
    names = []
    for pkg in PACKAGES:
        names.append(pkg)
        names += [m.name for m in pkgutil.walk_packages([str(ROOT / pkg)], prefix=f"{pkg}.")]
    return sorted(names)


def import_scripts(failures: dict[str, str]) -> int:
    count = 0
    for path in sorted((ROOT / "scripts").glob("*.py")):
        if path.name == Path(__file__).name:
            continue
        spec = importlib.util.spec_from_file_location(f"_script_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module   # dataclasses look their module up while the script runs
        try:
            spec.loader.exec_module(module)  # scripts do their work only under __main__
            count += 1
        except ImportError as e:
            failures[f"scripts/{path.name}"] = f"{type(e).__name__}: {e}"
    return count


def main() -> int:
    sys.path.insert(0, str(ROOT))
    failures: dict[str, str] = {}
    modules = project_modules()
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            failures[name] = f"{type(e).__name__}: {e}"
    n_scripts = import_scripts(failures)
    for name, err in failures.items():
        print(f"error: {name}: {err}; declare the package in pyproject.toml [project] dependencies", file=sys.stderr)
    print(f"{len(modules)} modules and {n_scripts} scripts imported, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
