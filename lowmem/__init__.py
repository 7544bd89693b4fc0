"""lowmem: peak-memory reduction for LoRA fine-tuning of LLMs on machines with little memory.

Reproduces and extends arXiv 2606.19528. One module per technique; `lowmem.reference` holds
the plain versions they are tested against. Start with `python -m lowmem --help`.
"""

import logging

# bitsandbytes' CPU backend tries to fetch an optional kernel from a model hub at import and
# warns when it cannot; we never want that download, so the warning is noise here.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"
