"""The run report: evaluation rows, the machine description, Markdown + JSON, and ``compressor publish``."""
