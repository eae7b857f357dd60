"""``msgate demo``: the whole system on the embedded defaults, with stand-in PACS and interface engine."""
