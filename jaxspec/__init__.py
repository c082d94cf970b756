"""jaxspec."""
