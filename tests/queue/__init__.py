"""Tests of remote operation through bluesky-queueserver."""
