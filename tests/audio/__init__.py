"""Tests: audio I/O, mel presets, sequence arithmetic, synthetic audio-visual data and AVP-RPO ranking."""
