"""The fault suite. This file makes `tests/faults/conftest.py` the module `faults.conftest`, so that
it never replaces `tests/conftest.py` as `conftest` (which the other test modules import)."""
