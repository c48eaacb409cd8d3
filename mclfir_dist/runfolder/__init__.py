"""A run folder: its layout (layout.py: every file's name and path) and its results.json (record.py: RunRecord,
the one writer; read_results, the one reader). Training writes a run through here; evaluation, retrieval, the
report and the CLI read it through here. Data only: reading a run imports nothing it names."""
