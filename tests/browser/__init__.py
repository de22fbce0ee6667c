"""Headless-Chromium helpers for the browser end-to-end tests (see ``page.py``)."""
