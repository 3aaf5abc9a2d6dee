"""Reports: Markdown and self-contained HTML pages built only from saved result files."""
