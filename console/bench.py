"""Benchmark commands (placeholder until written)."""
def register(app, engine_flags, start_engine):
    pass
