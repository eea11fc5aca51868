"""Metadata lives in pyproject.toml; this only copies profiles/*.yaml into the wheel.

The top-level profiles/ folder is the source of truth. A wheel carries a copy as
edge_runtime/_profiles/, which `edge_runtime.policy.profiles.profiles_dir()` finds when no checkout is around.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithProfiles(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "edge_runtime" / "_profiles"
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(Path(__file__).parent.joinpath("profiles").glob("*.yaml")):
            shutil.copy2(path, target / path.name)


setup(cmdclass={"build_py": BuildPyWithProfiles})
