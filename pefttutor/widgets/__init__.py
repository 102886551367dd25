"""The notebooks' interactive views, each a `Panel` that also leaves a static picture in the saved notebook.

| builder | notebook | shows |
|---|---|---|
| `svd_explorer` | 05 | a matrix rebuilt from its top r singular directions, what that costs and loses |
| `prefix_attention_viewer` | 03 | attention mass on a prefix, per layer and head (`pefttutor.attention_maps`) |
| `calculator_panel` | 06 | trainable parameters and training memory of any method on any architecture |
| `learning_curves` | 06 | the study's committed learning curves, by task and method |
"""

from .attention import prefix_attention_viewer
from .calculator import calculator_panel
from .curves import learning_curves
from .panel import Panel
from .svd import svd_explorer

__all__ = ["Panel", "calculator_panel", "learning_curves", "prefix_attention_viewer", "svd_explorer"]
