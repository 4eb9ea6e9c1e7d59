"""Small, named, explicitly applied patches of megatron-core (nothing is patched at import time)."""
