"""PANNs model families, one per file. ``MODELS`` is the ``polyfm.models`` entry point."""

from polyfm.audio.models.cnn6 import Cnn6
from polyfm.audio.models.cnn10 import Cnn10
from polyfm.audio.models.cnn14 import Cnn14, Cnn14_8k, Cnn14_16k
from polyfm.audio.models.cnn14_decision_level_max import Cnn14_DecisionLevelMax
from polyfm.audio.models.wavegram_logmel_cnn14 import Wavegram_Logmel_Cnn14

MODELS: dict[str, type] = {
    "Cnn14": Cnn14,
    "Cnn14_16k": Cnn14_16k,
    "Cnn14_8k": Cnn14_8k,
    "Cnn10": Cnn10,
    "Cnn6": Cnn6,
    "Cnn14_DecisionLevelMax": Cnn14_DecisionLevelMax,
    "Wavegram_Logmel_Cnn14": Wavegram_Logmel_Cnn14,
}

__all__ = ["MODELS", "Cnn6", "Cnn10", "Cnn14", "Cnn14_8k", "Cnn14_16k", "Cnn14_DecisionLevelMax", "Wavegram_Logmel_Cnn14"]
