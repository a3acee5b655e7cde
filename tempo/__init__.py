"""TEMPO: test-time training of reasoning models by Expectation-Maximisation."""

__version__ = "0.1.0"
