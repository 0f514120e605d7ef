"""Command groups of ``gestalt``, one module each; ``shared.cli`` adds them to the main group."""
