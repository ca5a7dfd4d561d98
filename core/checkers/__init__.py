"""Checkers: process, TCP, HTTP and command probes run by a CheckerSet, and the witness guard."""

from .base import Checker, CheckResult
from .runner import CheckerSet, CheckerStatus, build_checker
from .witness import any_witness_reachable

__all__ = ["CheckResult", "Checker", "CheckerSet", "CheckerStatus", "any_witness_reachable", "build_checker"]
