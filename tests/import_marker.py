"""Importing this module leaves a mark (a file named by PYTASKQML_TEST_IMPORT_MARK): a test can
tell whether a worker imported it."""

from __future__ import annotations

import os

from pytaskqml import Model

_mark = os.environ.get("PYTASKQML_TEST_IMPORT_MARK")
if _mark:
    with open(_mark, "w") as f:
        f.write(str(os.getpid()))


class Marked(Model):
    def predict(self, item: object) -> object:
        return item
