"""Packaging hook: the wheel carries models.yaml and assets/ (top-level files of the checkout) as
localchat/_data/, where localchat.settings.resource() finds them in an installed copy."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("models.yaml", "assets")


class BuildWithData(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "localchat" / "_data"
        target.mkdir(parents=True, exist_ok=True)
        for name in SHIPPED:
            source = ROOT / name
            if source.is_dir():
                shutil.copytree(source, target / name, dirs_exist_ok=True)
            else:
                shutil.copy2(source, target / name)


setup(cmdclass={"build_py": BuildWithData})
