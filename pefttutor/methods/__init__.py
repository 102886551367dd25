"""The finetuning methods, each built from scratch in its own module (`from pefttutor.methods import lora`)."""
