"""Hatchling build hook: ship the import-precedence hook beside the ``cmd`` package.

Adds three files to the root of site-packages, for regular *and* editable wheels:
``_cmd_fgvc_hook.py`` (the finder), ``cmd_fgvc.pth`` (imports it at start-up) and
``cmd_fgvc.start`` (the PEP 829 entry point that Python 3.15+ runs instead of the ``.pth`` import line).
"""

from __future__ import annotations

import os

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

HOOK_FILES = ("_cmd_fgvc_hook.py", "cmd_fgvc.pth", "cmd_fgvc.start")


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version: str, build_data: dict) -> None:
        if self.target_name != "wheel":
            return
        here = os.path.join(self.root, "_hook")
        key = "force_include_editable" if version == "editable" else "force_include"
        target = build_data.setdefault(key, {})
        for name in HOOK_FILES:
            target[os.path.join(here, name)] = name
