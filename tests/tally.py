"""Tallies of the fault campaigns (table-driven CLI cases, property-based fuzzing), printed together
at the end of every test run by ``conftest.pytest_terminal_summary``."""

LINES: list[str] = []
