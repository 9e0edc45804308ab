"""Fake of the WebUI's ``modules`` package (tests only). See ../README.md."""
