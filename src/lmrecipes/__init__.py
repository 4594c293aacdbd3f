"""lmrecipes: Hugging Face course training recipes on PyTorch Lightning."""

__version__ = "0.1.0"
