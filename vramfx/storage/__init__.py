"""Where weights come from: safetensors on disk (DiskMap), GGUF and scaled-fp8 files, whole
checkpoints, host memory."""

from vramfx.storage.diskmap import DiskMap
from vramfx.storage.host import HostSource
from vramfx.storage.source import TensorInfo, WeightSource
from vramfx.storage.state_dict import load_state_dict

__all__ = ["DiskMap", "HostSource", "TensorInfo", "WeightSource", "load_state_dict"]
