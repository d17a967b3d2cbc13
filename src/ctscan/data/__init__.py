"""Raw images, their audit, the one transform path and the processed store.

Submodules are imported where needed (`from ctscan.data.store import load_store`) so that
importing this package stays light; raw.py, transforms.py and audit.py never import torch.
"""
