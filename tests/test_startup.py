"""The command line starts light: building every command's options (and ``--help``) imports
neither torch nor transformers; they are imported by the commands that run a model.
(Behaviour, not timing: the timings are in benchmarks/startup.py and docs/PERFORMANCE.md.)"""

from __future__ import annotations

import os
import subprocess
import sys

HEAVY = ("torch", "transformers", "onnxruntime", "sklearn", "scipy", "matplotlib")


def _imported_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=os.environ.copy(), check=True)
    return set(done.stdout.split())


def test_import_cli_does_not_import_torch():
    assert _imported_after("import lakead.cli") == set()


def test_help_of_every_command_does_not_import_torch():
    code = (
        "import typer.testing, lakead.cli as c\n"
        "r = typer.testing.CliRunner()\n"
        "for cmd in ['', 'fit', 'predict', 'info', 'eval', 'ablate', 'baselines', 'serve', 'explain']:\n"
        "    res = r.invoke(c.app, [*cmd.split(), '--help'])\n"
        "    assert res.exit_code == 0, (cmd, res.output)\n"
    )
    assert _imported_after(code) == set()


def test_methods_registry_and_config_do_not_import_torch():
    assert _imported_after("from lakead.methods import METHODS; from lakead.methods.lake import LakeConfig; LakeConfig().validate()") == set()


def test_the_lazy_names_still_resolve():
    from lakead.methods.lake import LakeDetector
    from lakead.methods import METHODS, detector_class

    assert METHODS["lake"].detector_class is LakeDetector
    assert detector_class(LakeDetector) is LakeDetector
    assert METHODS["lake"].config_class.__name__ == "LakeConfig"
