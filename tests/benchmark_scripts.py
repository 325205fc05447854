"""Import a script of benchmarks/ (not a package) as a module, for the tests of its logic."""

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# The scripts import their neighbours (timing, profile_step) as top-level modules, as
# they do when run from benchmarks/.
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))


def load(name: str):
    """``benchmarks/<name>.py`` executed as the module ``name``, registered in
    ``sys.modules`` while it runs (dataclasses look their module up there) and left there:
    a later load replaces it."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
