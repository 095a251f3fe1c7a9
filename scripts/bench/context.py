"""What every section receives: the command-line settings, the report, and the data.

The data loads on first use, so sections that start their own processes (``multiproc``,
``full``) never hold MNIST in this one.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from functools import cached_property

from scripts.bench import setting
from scripts.bench.harness import Report


@dataclass
class Context:
    args: argparse.Namespace
    report: Report = field(default_factory=Report)

    @cached_property
    def setting(self) -> setting.Setting:
        return setting.load(self.args.data_dir)
