"""Core package of the medical image diagnosis app: readers, preprocessing, models,
training, metrics, explanations and inference. Nothing here imports Streamlit."""

__version__ = "0.1.0"
