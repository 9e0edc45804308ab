"""What every layer may use: the training config (its options and their checks), files written
atomically, model names, memory helpers and the small types a run reports through. Imports
nothing else of the package."""
