"""Test helpers for upcycle_fx: the model zoo used as the FFN-finder oracle."""
