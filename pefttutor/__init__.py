"""pefttutor: parameter-efficient finetuning built from scratch, on real models and real data."""

import logging

__version__ = "0.1.0"

# bitsandbytes (a test reference, imported by peft when installed) warns on every AVX512-BF16 CPU that
# it cannot fetch an optional kernel from the Hugging Face hub; we never fetch anything, so the
# warning is noise on every notebook's stderr. Its real errors still show.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
