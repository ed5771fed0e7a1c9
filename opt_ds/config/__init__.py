"""The experiment config: validated dataclasses loaded from YAML (`experiment`), and the loader they share
with the model configs (`fields`)."""
