"""remem_ray is a real package: a file to ship, a version, a public API that imports lazily."""

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import remem_ray


def test_package_has_a_file_and_a_version():
    """`remem sweep submit --ship-package` ships Path(remem_ray.__file__).parent (issue 12, item 10)."""
    assert remem_ray.__file__ is not None
    assert (Path(remem_ray.__file__).parent / "cli.py").is_file()
    assert remem_ray.__version__ == version("remem-ray")


def test_public_api_resolves_and_importing_the_package_stays_light():
    from remem_ray.sam import SAM

    assert remem_ray.SAM is SAM
    for name in remem_ray.__all__:
        assert getattr(remem_ray, name) is not None
    code = "import sys, remem_ray; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"]
