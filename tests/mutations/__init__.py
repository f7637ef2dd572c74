"""Mutation testing of the hand-written backwards: ``python -m tests.mutations`` applies each
mistake of :mod:`tests.mutations.catalog` to a temporary copy of the package, runs the
default-tier tests meant to catch it, and writes ``REPORT.md`` and ``report.json`` here."""
