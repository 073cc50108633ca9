"""``redcredit demo``: a scripted scenario, then a gated streaming chat API."""
