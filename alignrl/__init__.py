"""alignrl: align diffusion and flow-matching image models with RL, from Hydra recipes."""

import logging as _logging

__version__ = "0.1.0"


class _DropTorchvisionFallbackNotice(_logging.Filter):
    """transformers warns at import that its image processors fall back to PIL without torchvision;
    alignrl never needs torchvision (it is an optional extra), so the notice is noise."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


_logging.getLogger("transformers.utils.import_utils").addFilter(_DropTorchvisionFallbackNotice())
