"""Batch-effect correction methods and their building blocks (pure PyTorch; no Ray, no MLflow).

Public surface: `Method`, `Batch`, `TaskSpec`, `Needs`, `DataRequest`, the registry functions
`get_method`, `list_methods`, `register`, and `MethodError`.
"""

from .base import Batch, DataRequest, Method, MethodError, Needs, TaskSpec
from .registry import get_method, list_methods, register

__all__ = ["Batch", "DataRequest", "Method", "MethodError", "Needs", "TaskSpec", "get_method", "list_methods",
           "register"]
