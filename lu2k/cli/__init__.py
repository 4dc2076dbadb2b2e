"""Command-line tools: ``lu2k`` (data tools, demo, bench, lab), ``lu2kctl`` (daemon control)."""
