"""Ship the engine hook's ``.pth`` at the top of the wheel, so ``pip install prefixgate`` puts it in site-packages.

(setuptools data files would land it in the environment prefix, where Python never reads it.) The line it holds
does nothing unless ``PREFIXGATE_INDEX_URL`` or ``CONTEXTPILOT_INDEX_URL`` is set. Editable installs use
``prefixgate install-hook`` instead.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "prefixgate_hooks.pth"


class BuildPyWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(str(Path("engines", "hooks", PTH)), str(Path(self.build_lib, PTH)), preserve_mode=False)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib, PTH))]


setup(cmdclass={"build_py": BuildPyWithPth})
