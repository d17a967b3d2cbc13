"""Operations around the engine: profiling, export and sweeps."""
