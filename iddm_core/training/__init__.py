"""DreamBooth-LoRA training: the trainer, the LoRA and its kohya file format, and the resume state of long runs."""
