"""`lipsync-import`: turn a SyncTalk_2D training run (checkpoint + dataset) into a model this server serves.

Why a package of its own: the import runs once per avatar, offline, and must never need torch. It reads the
checkpoint zip with a restricted unpickler, builds the ONNX graphs with the demo models' GraphBuilder from
the real weights, turns the dataset's frames and landmarks into an avatar, and adds the model to the
services' configs. See docs/models.md.
"""

from model_import.errors import ModelImportError

__version__ = "1.0.0"

__all__ = ["ModelImportError", "__version__"]
