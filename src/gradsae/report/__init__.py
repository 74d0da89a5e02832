"""Presentation: tables, the sweep table, the concept-steering report and the HTML page.

Everything here reads result files; import the part you need (``gradsae.report.tables``,
``.html``, ``.sweep``, ``.concepts``).
"""
