"""Batch-effect correction methods and their building blocks (pure PyTorch; no Ray, no MLflow).

Public surface, everything a method author needs from one import: `Method`, `Batch`, `TaskSpec`, `Needs`,
`DataRequest`, `Param` (a hyperparameter's default with its valid values), the network and loss helpers
(`Network`, `masked_cross_entropy`, `accuracy`, `as_list`, `queries_with_labels`), the registry functions
`get_method`, `list_methods`, `register`, and `MethodError`.
"""

from .base import Batch, DataRequest, Method, MethodError, Needs, TaskSpec, as_list, queries_with_labels
from .hparams import Param
from .network import Network, accuracy, masked_cross_entropy
from .registry import get_method, list_methods, register

__all__ = ["Batch", "DataRequest", "Method", "MethodError", "Needs", "Network", "Param", "TaskSpec", "accuracy",
           "as_list", "get_method", "list_methods", "masked_cross_entropy", "queries_with_labels", "register"]
