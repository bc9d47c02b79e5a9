"""Drafters propose token trees; the server verifies them. Each one is a `Drafter`."""
