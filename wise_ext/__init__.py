"""wise-ext: WISE lifelong model editing with fused C++/CUDA operators."""
from .ops import routing_distance, shard_mask, sharded_sgd_step_, ties_merge, wise_ffn

__all__ = ["ties_merge", "wise_ffn", "routing_distance", "sharded_sgd_step_", "shard_mask"]
__version__ = "0.1.0"
