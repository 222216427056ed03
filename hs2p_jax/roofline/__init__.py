"""Datasheet arithmetic: model FLOPs, chip peaks, a decode step's time."""
