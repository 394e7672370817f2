"""The reversible families: one file per family, all driven by `ReversibleStage`."""
