"""wise-ext: WISE lifelong model editing with fused C++/CUDA operators."""
from .checkpoint import attach, detach
from .config import WiseConfig
from .editor import EditResult, WiseEditor
from .layer import WiseLayer
from .ops import routing_distance, shard_mask, sharded_sgd_step_, ties_merge, wise_ffn
from .requests import EditRequest, load_requests

__all__ = [
    "ties_merge", "wise_ffn", "routing_distance", "sharded_sgd_step_", "shard_mask",
    "WiseConfig", "WiseLayer", "WiseEditor", "EditRequest", "EditResult", "load_requests", "attach", "detach",
]
__version__ = "0.1.0"
