"""`pipeline export`: a trained run's checkpoint as a folder diffusers loads on its own."""

from .export import ExportConfig, export_pipeline

__all__ = ["ExportConfig", "export_pipeline"]
